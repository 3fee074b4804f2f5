"""MOSI OOD repartition (OOD_MOSI/seven), 7-class."""
from configs import default


def get_config():
  config = default.get_config()
  config.data.setting = 'ood'
  config.task = 'seven'
  return config
