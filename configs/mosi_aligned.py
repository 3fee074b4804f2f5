"""MOSI word-aligned features (WSAM skipped)."""
from configs import default


def get_config():
  config = default.get_config()
  config.data.aligned = True
  return config
