"""TFDS builders (array_record, read without TensorFlow) and `build_source`.

  cider_mosi       CMU-MOSI pickles from a manual dir   (mosi.py)
  cider_mosei      CMU-MOSEI pickles from a manual dir  (mosei.py)
  cider_synthetic  the generated data                   (synthetic.py)

Importing this package registers the three builders, so prepared data can also be read with
`tfds.data_source('cider_mosi/unaligned', data_dir=..., split='train')`.
"""
from cider_jax.data.builders.source import build_source, make_builder, prepare, TfdsSource
from cider_jax.data.builders import mosei, mosi, synthetic  # registers the builders

__all__ = ['build_source', 'make_builder', 'prepare', 'TfdsSource']
