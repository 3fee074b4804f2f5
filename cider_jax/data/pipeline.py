"""Input pipeline: splits for a config, shuffled training batches (grain), padded eval batches.

A batch is a flat dict of numpy arrays with fixed shapes and exactly the keys of
`BATCH_KEYS`:

  text_ids (B, L) int32 · text_mask (B, L) float32 · text_segments (B, L) int32 ·
  audio (B, La, Da) float32 · audio_mask (B, La) float32 · vision (B, Lv, Dv) float32 ·
  vision_mask (B, Lv) float32 · label (B,) int32 (of the configured task) ·
  valid (B,) float32 (0 on padding) · index (B,) int32 (row of the example in its split)

Typical use in a training loop:

  splits = load_splits(config, workdir)                  # {'train', 'valid', 'test'}: Split
  source = build_train_source(config, workdir)            # TFDS array_record records
  # or: source = split_to_examples(splits['train'], config.task)   (in memory)
  it = train_iterator(source, per_host_batch, seed=config.train.seed)   # repeats forever
  state = it.get_state(); ...; it.set_state(state)       # or grain.checkpoint.CheckpointSave
  for batch in eval_batches(splits['valid'], eval_batch, config.task): ...
"""
import os
from typing import Iterator, Mapping, Optional, Tuple

import grain
import numpy as np

from cider_jax import tokens
from cider_jax.data import mmsa, synthetic
from cider_jax.data.validate import DataError

EXAMPLE_KEYS = ('text_ids', 'text_mask', 'text_segments', 'audio', 'audio_mask', 'vision',
                'vision_mask', 'label', 'index')
BATCH_KEYS = EXAMPLE_KEYS[:-2] + ('label', 'valid', 'index')
KEEP_KEYS = ('text_keep', 'audio_keep', 'vision_keep')  # optional, see eval_batches


# ---------------------------------------------------------------------------- splits


def cache_dir(config, workdir: Optional[str] = None) -> str:
  """Folder for generated data and TFDS records: config.data.cache_dir or <workdir>/data."""
  path = config.data.cache_dir or (os.path.join(workdir, 'data') if workdir else '')
  if not path:
    raise DataError('no cache folder for prepared data: set --config.data.cache_dir or '
                    'pass a workdir')
  return os.path.abspath(os.path.expanduser(path))


def tfds_dir(config, workdir: Optional[str] = None) -> str:
  """TFDS data dir for the array_record files: <cache_dir>/tfds."""
  return os.path.join(cache_dir(config, workdir), 'tfds')


def load_splits(config, workdir: Optional[str] = None,
                special: tokens.SpecialTokens = tokens.BERT) -> dict:
  """{'train', 'valid', 'test'} -> validated `mmsa.Split` for a full config.

  config.data.source 'mmsa': the MMSA pickles that `mmsa.resolve_split_paths` names
  (data.dir layout or data.file). 'synthetic': the generated data, written once to
  `<cache_dir>/synthetic-<hash>.pkl` and read back through the same validated loader.
  special: the text encoder's special tokens (the validator checks [CLS] / [SEP] with them).
  """
  source = config.data.source
  if source == 'mmsa':
    return mmsa.load_mmsa(config, special=special)
  if source == 'synthetic':
    path = synthetic.synthetic_path(cache_dir(config, workdir), config)
    return mmsa.load_mmsa(path, aligned=bool(config.data.aligned), special=special)
  raise DataError(f"config.data.source is {source!r}; expected 'mmsa' or 'synthetic'")


def build_train_source(config, workdir: Optional[str] = None, split: str = 'train'):
  """TFDS-backed random-access source of `split` (records prepared on first use)."""
  from cider_jax.data import builders  # pylint: disable=g-import-not-at-top
  return builders.build_source(config, split, tfds_dir(config, workdir))


# ---------------------------------------------------------------------------- examples


def split_to_arrays(split: mmsa.Split, task: str) -> dict:
  """Stacked example arrays (N, ...) of a split: the batch keys minus `valid`."""
  return {
      'text_ids': split.text_ids, 'text_mask': split.text_mask,
      'text_segments': split.text_segments, 'audio': split.audio,
      'audio_mask': split.audio_mask, 'vision': split.vision, 'vision_mask': split.vision_mask,
      'label': split.labels(task).astype(np.int32),
      'index': np.arange(len(split), dtype=np.int32),
  }


class SplitSource:
  """Random-access source over an in-memory split: ds[i] is example i (EXAMPLE_KEYS)."""

  def __init__(self, split: mmsa.Split, task: str):
    self._arrays = split_to_arrays(split, task)
    self._n = len(split)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self._n:
      raise IndexError(f'example {i} out of range for a split of {self._n}')
    return {k: v[i] for k, v in self._arrays.items()}

  def gather(self, rows) -> dict:
    """Examples `rows` (B,) stacked into one batch dict (EXAMPLE_KEYS), by fancy indexing."""
    rows = np.asarray(rows, np.int64)
    return {k: v[rows] for k, v in self._arrays.items()}

  def __repr__(self) -> str:
    return f'SplitSource(n={self._n})'


def split_to_examples(split: mmsa.Split, task: str) -> SplitSource:
  """The split as a sequence of per-example dicts (EXAMPLE_KEYS), usable as a grain source."""
  return SplitSource(split, task)


# ---------------------------------------------------------------------------- training


def _process_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()


def steps_per_epoch(num_records, batch_size: int, shard_count: Optional[int] = None) -> int:
  """Batches per epoch on each host: (num_records // shard_count) // batch_size.

  num_records: an int, or anything with a length (a Split, a source).
  shard_count: number of hosts; None = jax.process_count() (as `train_iterator`).
  """
  n = num_records if isinstance(num_records, (int, np.integer)) else len(num_records)
  count = _process_count() if shard_count is None else int(shard_count)
  return (int(n) // count) // batch_size


def _shard_pair(shard) -> Tuple[int, int]:
  """(index, count) from None (this jax process), a pair, or grain ShardOptions."""
  if shard is None:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.process_index(), jax.process_count()
  if hasattr(shard, 'shard_index') and hasattr(shard, 'shard_count'):
    return int(shard.shard_index), int(shard.shard_count)
  index, count = (int(v) for v in shard)
  return index, count


def _add_valid(batch: dict) -> dict:
  batch = dict(batch)
  batch['valid'] = np.ones(batch['label'].shape, np.float32)
  return {k: batch[k] for k in BATCH_KEYS}


def train_iterator(source, batch_size: int, seed: int, num_epochs: Optional[int] = None,
                   shard=None, *, task: Optional[str] = None, num_threads: int = 2,
                   prefetch: int = 4) -> grain.DatasetIterator:
  """Shuffled training batches of one host, as a checkpointable grain iterator.

  Every epoch draws a fresh permutation of all records (a pure function of `seed` and the
  epoch), keeps the first (N // shard_count) * shard_count positions and gives host h the
  positions h, h + count, ...: the hosts' shards are disjoint and equally large. Each host
  batches its shard into `steps_per_epoch` full batches and drops the rest of the epoch
  (fewer than batch_size examples, different ones every epoch); batches never span epochs.
  Reading runs in `num_threads` background threads with `prefetch` batches buffered.

  Args:
    source: random-access source of examples (EXAMPLE_KEYS), e.g. `build_train_source(...)`
      or `split_to_examples(split, task)`; or a `mmsa.Split` together with `task`.
    batch_size: examples per batch on this host (the global batch / process count).
    seed: shuffle seed in [0, 2**32).
    num_epochs: passes over the data; None (default) repeats forever.
    shard: (process_index, process_count) or grain `ShardOptions`; None =
      (jax.process_index(), jax.process_count()).
    task: 'binary' or 'seven', only when `source` is a Split.

  Returns:
    An iterator of batches (BATCH_KEYS, `valid` all ones) with `get_state()` /
    `set_state(state)`; a restored state continues with the same next batch. It also works
    with `grain.checkpoint.CheckpointSave/CheckpointRestore` in an orbax checkpoint.
  """
  if isinstance(source, mmsa.Split):
    if task is None:
      raise ValueError('train_iterator of a Split needs task= (binary or seven)')
    source = SplitSource(source, task)
  index, count = _shard_pair(shard)
  if count < 1 or not 0 <= index < count:
    raise ValueError(f'shard {shard}: expected (process_index, process_count) with '
                     '0 <= process_index < process_count')
  if not 0 <= int(seed) < 2**32:
    raise ValueError(f'seed {seed}: expected an integer in [0, 2**32)')
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f'num_epochs {num_epochs}: expected >= 1 (or None to repeat forever)')
  n = len(source)
  per_host = n // count
  if batch_size < 1 or per_host < batch_size:
    raise DataError(f'training split of {n} examples over {count} host(s) gives {per_host} '
                    f'per host, fewer than the batch size {batch_size}; lower the batch size')
  if isinstance(source, SplitSource):  # in memory: shuffle row numbers, gather whole batches
    ds = grain.MapDataset.range(n).shuffle(seed=int(seed))
  else:
    ds = grain.MapDataset.source(source).shuffle(seed=int(seed))
  ds = ds[:per_host * count][index::count].batch(batch_size, drop_remainder=True)
  if isinstance(source, SplitSource):
    ds = ds.map(source.gather)
  ds = ds.map(_add_valid)
  ds = ds.repeat(num_epochs)
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options))


def get_iterator_state(it) -> dict:
  """JSON-serialisable position of a `train_iterator` (batches already yielded)."""
  return it.get_state()


def set_iterator_state(it, state: dict) -> None:
  """Moves a fresh `train_iterator` (same arguments) to a state from `get_iterator_state`."""
  it.set_state(state)


def position_in_epoch(it, steps_per_epoch_: int) -> int:
  """Batches of the current epoch already yielded by a `train_iterator` (0 at a boundary)."""
  return int(it.get_state()['next_index']) % steps_per_epoch_


# ---------------------------------------------------------------------------- evaluation


def eval_batches(split_arrays, batch_size: int, task: Optional[str] = None, *, keeps=None
                 ) -> Iterator[dict]:
  """Fixed-shape batches of a whole split, in order; no example dropped or repeated as valid.

  split_arrays: `split_to_arrays(split, task)`, or a `mmsa.Split` with `task`
    (`eval_batches(split, batch_size, task)`; `eval_batches(split, task, batch_size)` works too).
  keeps: optional keep masks of a test missing mode for the whole split, a tuple
    (text_keep (N, L), audio_keep (N, La), vision_keep (N, Lv)) as `masks.test_keep` returns,
    or a dict with those keys; batched as float32 under the same names after BATCH_KEYS.

  The last batch, when short, is filled by repeating its own examples; the filler rows have
  valid = 0 (their `index` is that of the example they repeat). Yields BATCH_KEYS dicts
  (plus KEEP_KEYS with `keeps`).
  """
  if isinstance(batch_size, str) and not isinstance(task, str):
    batch_size, task = task, batch_size
  if isinstance(split_arrays, mmsa.Split):
    if task is None:
      raise ValueError('eval_batches of a Split needs the task (binary or seven)')
    split_arrays = split_to_arrays(split_arrays, task)
  if not isinstance(split_arrays, Mapping):
    raise TypeError(f'eval_batches expects a dict of arrays, got {type(split_arrays).__name__}')
  missing = [k for k in EXAMPLE_KEYS if k not in split_arrays]
  if missing:
    raise ValueError(f'eval_batches: arrays lack {missing}; expected {list(EXAMPLE_KEYS)}')
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f'batch_size {batch_size!r}: expected an integer >= 1')
  n = len(split_arrays['label'])
  arrays = {k: np.asarray(split_arrays[k]) for k in EXAMPLE_KEYS}
  keys = BATCH_KEYS
  if keeps is not None:
    if not isinstance(keeps, Mapping):
      keeps = dict(zip(KEEP_KEYS, keeps))
    for k, like in zip(KEEP_KEYS, ('text_mask', 'audio_mask', 'vision_mask')):
      if k not in keeps:
        raise ValueError(f'eval_batches: keeps lack {k!r}; expected {list(KEEP_KEYS)}')
      keep = np.asarray(keeps[k], np.float32)
      if keep.shape != arrays[like].shape:
        raise ValueError(f'eval_batches: {k} has shape {keep.shape}; expected '
                         f'{arrays[like].shape} like {like}')
      arrays[k] = keep
    keys = BATCH_KEYS + KEEP_KEYS
  for start in range(0, n, batch_size):
    real = np.arange(start, min(start + batch_size, n))
    rows = np.resize(real, batch_size)
    batch = {k: v[rows] for k, v in arrays.items()}
    batch['valid'] = (np.arange(batch_size) < len(real)).astype(np.float32)
    yield {k: batch[k] for k in keys}


def num_eval_batches(num_examples: int, batch_size: int) -> int:
  """ceil(num_examples / batch_size)."""
  return -(-num_examples // batch_size)
