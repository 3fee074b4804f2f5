"""Cross-dataset: train/valid on MOSI, test on MOSEI (aligned; MSA_cross_datasets)."""
from configs import default


def get_config():
  config = default.get_config()
  config.data.setting = 'cross_dataset'
  config.data.aligned = True
  config.model.cross_dataset = True
  return config
