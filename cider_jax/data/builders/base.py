"""Shared parts of the TFDS builders: record features, the generic MMSA builder.

Each record is one example of a validated `mmsa.Split` plus its row number `index` in that
split (TFDS shuffles records at write time, so record i is not example i). Arrays are stored
as raw bytes with their shapes, so any L, La, Lv, Da, Dv fits and reading needs no
TensorFlow.
"""
import numpy as np
import tensorflow_datasets as tfds

from cider_jax.data import mmsa

RECORD_VERSION = '1.0.0'


def record_features() -> tfds.features.FeaturesDict:
  """Features of one record; (L,), (La, Da), ... are per-example shapes."""
  def tensor(rank, dtype):
    return tfds.features.Tensor(shape=(None,) * rank, dtype=dtype, encoding='bytes')
  return tfds.features.FeaturesDict({
      'index': tfds.features.Scalar(np.int32, doc='row of the example in its split'),
      'text_ids': tensor(1, np.int32),
      'text_mask': tensor(1, np.float32),
      'text_segments': tensor(1, np.int32),
      'audio': tensor(2, np.float32),
      'audio_mask': tensor(1, np.float32),
      'vision': tensor(2, np.float32),
      'vision_mask': tensor(1, np.float32),
      'score': tfds.features.Scalar(np.float32),
      'label3': tfds.features.Scalar(np.int32),
      'label7': tfds.features.Scalar(np.int32),
      'id': tfds.features.Text(),
      'raw_text': tfds.features.Text(),
  })


_ARRAY_FIELDS = ('text_ids', 'text_mask', 'text_segments', 'audio', 'audio_mask', 'vision',
                 'vision_mask', 'score', 'label3', 'label7')


def split_records(split: mmsa.Split):
  """Yields (key, record) for every example of `split`, key = index."""
  for i in range(len(split)):
    record = {k: getattr(split, k)[i] for k in _ARRAY_FIELDS}
    record.update(index=i, id=str(split.ids[i]), raw_text=str(split.raw_text[i]))
    yield i, record


class MmsaBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Generic builder: subclasses say how to get the validated splits (`load_splits`)."""

  VERSION = tfds.core.Version(RECORD_VERSION)
  RELEASE_NOTES = {RECORD_VERSION: 'Validated MMSA splits with an explicit example index.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=record_features(),
                                          homepage='https://github.com/gw-zhong/CIDer')

  def load_splits(self, dl_manager) -> dict:
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    return {name: self._generate_examples(split)
            for name, split in self.load_splits(dl_manager).items()}

  def _generate_examples(self, split):  # pytype: disable=signature-mismatch
    return split_records(split)
