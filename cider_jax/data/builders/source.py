"""Prepare the TFDS records for a config and expose them as a random-access source."""
import contextlib
import os

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from cider_jax.data import mmsa


def _data_cfg(cfg):
  return getattr(cfg, 'data', cfg)


@contextlib.contextmanager
def _quiet_absl():
  """Hides TFDS's absl warnings about custom builder configs (they are intended here)."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def make_builder(cfg, data_dir: str) -> tfds.core.DatasetBuilder:
  """The TFDS builder (with its config) for `cfg` (a full config: `.data`, `.task`)."""
  with _quiet_absl():
    return _make_builder(cfg, data_dir)


def _make_builder(cfg, data_dir):
  from cider_jax.data.builders import mmsa_builder, mosei, mosi, synthetic  # pylint: disable=g-import-not-at-top
  data = _data_cfg(cfg)
  task = getattr(cfg, 'task', 'binary')
  if data.source == 'synthetic':
    return synthetic.CiderSynthetic(data_dir=data_dir,
                                    config=synthetic.SyntheticConfig.from_cfg(data))
  if data.source != 'mmsa':
    raise mmsa.DataError(f"config.data.source is {data.source!r}; expected 'mmsa' or 'synthetic'")
  cls = {'mosi': mosi.CiderMosi, 'mosei': mosei.CiderMosei}.get(data.dataset)
  if cls is None:
    raise mmsa.DataError(f"config.data.dataset is {data.dataset!r}; expected 'mosi' or 'mosei'")
  if data.file:
    config = mmsa_builder.file_config(data.file, bool(data.aligned), data.setting)
  else:
    config = mmsa_builder.config_name(data.setting, bool(data.aligned), task)
    if config not in {c.name for c in cls.BUILDER_CONFIGS}:
      raise mmsa.DataError(f'no TFDS config {config!r} for {data.dataset}: available '
                           f'{sorted(c.name for c in cls.BUILDER_CONFIGS)}')
  return cls(data_dir=data_dir, config=config)


def prepare(cfg, data_dir: str) -> tfds.core.DatasetBuilder:
  """Writes the array_record files for `cfg` under `data_dir` once; returns the builder.

  The MMSA pickles are read (and validated) only on the first call; later calls reuse the
  records. Replace a pickle in place and the records go stale: delete `data_dir/cider_*`.
  """
  data = _data_cfg(cfg)
  builder = make_builder(cfg, data_dir)
  with _quiet_absl():
    prepared = builder.is_prepared()
  if not prepared:
    manual_dir = os.path.abspath(os.path.expanduser(data.dir)) if data.dir else None
    if data.source == 'mmsa':  # a missing file or folder: the loader's clear message now
      for path in set(mmsa.resolve_split_paths(data, getattr(cfg, 'task', 'binary')).values()):
        mmsa.require_file(path)
    tfds.disable_progress_bar()
    with _quiet_absl():
      builder.download_and_prepare(
          file_format='array_record',
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


class TfdsSource:
  """Random-access source of examples (the batch keys minus `valid`) over TFDS records.

  ds[i] -> {'text_ids' (L,) int32, 'text_mask' (L,) float32, 'text_segments' (L,) int32,
            'audio' (La, Da) float32, 'audio_mask' (La,) float32, 'vision' (Lv, Dv) float32,
            'vision_mask' (Lv,) float32, 'label' () int32, 'index' () int32}
  Record order is the shuffled order of the files; `index` is the row in the split.
  Every record is decoded in Python; `pipeline.split_to_examples` serves the same examples
  from memory when the split fits there.
  """

  def __init__(self, data_source, task: str):
    if task not in ('binary', 'seven'):
      raise ValueError(f"unknown task {task!r}: expected 'binary' or 'seven'")
    self._ds = data_source
    self._label_key = 'label3' if task == 'binary' else 'label7'

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, record_key: int) -> dict:
    return self._convert(self._ds[record_key])

  def __getitems__(self, record_keys):
    return [self._convert(r) for r in self._ds.__getitems__(record_keys)]

  def _convert(self, r) -> dict:
    return {
        'text_ids': np.asarray(r['text_ids'], np.int32),
        'text_mask': np.asarray(r['text_mask'], np.float32),
        'text_segments': np.asarray(r['text_segments'], np.int32),
        'audio': np.asarray(r['audio'], np.float32),
        'audio_mask': np.asarray(r['audio_mask'], np.float32),
        'vision': np.asarray(r['vision'], np.float32),
        'vision_mask': np.asarray(r['vision_mask'], np.float32),
        'label': np.int32(r[self._label_key]),
        'index': np.int32(r['index']),
    }

  def __repr__(self) -> str:
    return f'TfdsSource({self._ds!r})'


def build_source(cfg, split: str, data_dir: str) -> TfdsSource:
  """Random-access source over the TFDS records of `split` for `cfg` (prepared on first use).

  cfg: a full config (`.data`, `.task`); data_dir: the TFDS data dir, e.g.
  `<config.data.cache_dir or workdir/data>/tfds` (see pipeline.tfds_dir).
  """
  if split not in mmsa.SPLITS:
    raise ValueError(f'unknown split {split!r}: expected one of {mmsa.SPLITS}')
  builder = prepare(cfg, data_dir)
  return TfdsSource(builder.as_data_source(split=split), getattr(cfg, 'task', 'binary'))
