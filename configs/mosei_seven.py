"""MOSEI unaligned, 7-class."""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'mosei'
  config.task = 'seven'
  return config
