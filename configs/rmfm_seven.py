"""7-class task on MOSI unaligned."""
from configs import default


def get_config():
  config = default.get_config()
  config.task = 'seven'
  return config
