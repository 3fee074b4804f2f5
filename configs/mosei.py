"""MOSEI unaligned, 3-class."""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'mosei'
  return config
