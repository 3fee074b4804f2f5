"""TFDS builder `cider_mosi`: CMU-MOSI from MMSA pickles (iid, OOD repartition, cross-dataset)."""
from cider_jax.data.builders import mmsa_builder


class CiderMosi(mmsa_builder.MmsaDatasetBuilder):
  """CMU-MOSI (Da 5, Dv 20; unaligned L/La/Lv 50/375/500)."""

  name = 'cider_mosi'
  DATASET = 'mosi'
  BUILDER_CONFIGS = mmsa_builder.standard_configs('mosi', with_ood=True)
