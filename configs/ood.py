"""MOSI OOD repartition (OOD_MOSI/binary), 3-class."""
from configs import default


def get_config():
  config = default.get_config()
  config.data.setting = 'ood'
  return config
