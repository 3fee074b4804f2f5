"""TFDS builder `cider_synthetic`: the generated data of cider_jax.data.synthetic.

One builder config per parameter set (seed and sizes); its name carries the seed and a hash
of the parameters, so different sizes never share records.
"""
import tensorflow_datasets as tfds

from cider_jax.data import mmsa
from cider_jax.data import synthetic
from cider_jax.data.builders import base


class SyntheticConfig(tfds.core.BuilderConfig):
  """Holds the generator parameters (`synthetic.synthetic_params`)."""

  def __init__(self, *, params: dict, **kwargs):
    super().__init__(**kwargs)
    self.params = dict(params)

  @classmethod
  def from_cfg(cls, cfg) -> 'SyntheticConfig':
    params = synthetic.synthetic_params(cfg)
    return cls(name=f"seed{params['seed']}_{synthetic.params_hash(params)}", params=params,
               description=f'generated MMSA-format data {params}')


class CiderSynthetic(base.MmsaBuilder):
  """Generated MMSA-format data; build it with `config=SyntheticConfig.from_cfg(cfg)`."""

  name = 'cider_synthetic'

  def load_splits(self, dl_manager) -> dict:
    if not isinstance(self.builder_config, SyntheticConfig):
      raise ValueError('cider_synthetic needs config=SyntheticConfig.from_cfg(config)')
    data = synthetic.generate(self.builder_config.params)
    return mmsa.splits_from_dict(data, source=f'<synthetic {self.builder_config.name}>')
