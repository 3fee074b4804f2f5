"""TFDS builder `cider_mosei`: CMU-MOSEI from MMSA pickles (iid, cross-dataset)."""
from cider_jax.data.builders import mmsa_builder


class CiderMosei(mmsa_builder.MmsaDatasetBuilder):
  """CMU-MOSEI (Da 74, Dv 35; unaligned L/La/Lv 50/500/500)."""

  name = 'cider_mosei'
  DATASET = 'mosei'
  BUILDER_CONFIGS = mmsa_builder.standard_configs('mosei', with_ood=False)
