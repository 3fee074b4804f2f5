"""MOSEI unaligned, 7-class."""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'mosei'
  config.train.min_epochs = 10  # 16,326 train examples: 10 epochs are 1,270 steps at batch 128
  config.task = 'seven'
  return config
