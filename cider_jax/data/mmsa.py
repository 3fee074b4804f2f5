"""Reader and validator for MMSA pickles (docs/model.md §1).

An MMSA file is a dict `{train, valid, test}` of dicts of arrays:

  text_bert              (N, 3, L) float   token ids / attention mask / segment ids
  audio                  (N, La, Da) float may contain -inf (set to 0 here)
  vision                 (N, Lv, Dv) float
  audio_lengths          (N,) int          unaligned files only
  vision_lengths         (N,) int          unaligned files only
  regression_labels      (N,) float        sentiment score in [-3, 3]
  classification_labels  (N,) int          0 negative / 1 neutral / 2 positive
  raw_text, id           (N,) str          optional here (filled in when absent)

`load_mmsa` reads a file (plain pickle or joblib) or the files a config points at, checks
every field and returns one typed `Split` per split. Any problem raises `DataError` with one
line naming the file, split, field, example index and what was expected.

  python -m cider_jax.data.mmsa FILE   # prints a summary, or one error line and exit code 1
"""
import argparse
import dataclasses
import os
import sys
from typing import Any, Mapping, Optional

import numpy as np

from cider_jax import tokens
from cider_jax.data import safe_pickle, standardize, validate
from cider_jax.data.validate import DataError

__all__ = [
    'DataError', 'Split', 'SPLITS', 'resolve_path', 'resolve_split_paths', 'require_file',
    'read_pickle',
    'splits_from_dict', 'load_mmsa', 'label3_from_score', 'label7_from_score',
]

SPLITS = ('train', 'valid', 'test')
TASKS = ('binary', 'seven')
_SETTINGS = ('iid', 'ood', 'cross_dataset')
_DATASETS = ('mosi', 'mosei')


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One validated split. N examples; L, La, Lv, Da, Dv come from the data.

  text_ids      (N, L) int32     token ids ([CLS] ... [SEP] then padding 0)
  text_mask     (N, L) float32   attention mask, 1 on a prefix
  text_segments (N, L) int32     segment ids
  audio         (N, La, Da) float32, zero where the file had -inf
  audio_mask    (N, La) float32  1 on the first audio_length frames
  vision        (N, Lv, Dv) float32
  vision_mask   (N, Lv) float32
  score         (N,) float32     sentiment score in [-3, 3]
  label3        (N,) int32       0 negative / 1 neutral / 2 positive
  label7        (N,) int32       round(clip(score, -3, 3)) + 3
  ids           (N,) object      example ids (str)
  raw_text      (N,) object      raw sentences (str)
  """
  text_ids: np.ndarray
  text_mask: np.ndarray
  text_segments: np.ndarray
  audio: np.ndarray
  audio_mask: np.ndarray
  vision: np.ndarray
  vision_mask: np.ndarray
  score: np.ndarray
  label3: np.ndarray
  label7: np.ndarray
  ids: np.ndarray
  raw_text: np.ndarray

  def __len__(self) -> int:
    return int(self.text_ids.shape[0])

  @property
  def text_lengths(self) -> np.ndarray:
    """(N,) int32 number of attended tokens, [CLS] and [SEP] included."""
    return self.text_mask.sum(axis=1).astype(np.int32)

  def labels(self, task: str) -> np.ndarray:
    """(N,) int32 labels of `task`: label3 for 'binary', label7 for 'seven'."""
    if task == 'binary':
      return self.label3
    if task == 'seven':
      return self.label7
    raise ValueError(f"unknown task {task!r}: expected 'binary' or 'seven'")

  @property
  def shapes(self) -> dict:
    """Per-example shapes, e.g. {'text': (L,), 'audio': (La, Da), 'vision': (Lv, Dv)}."""
    return {'text': self.text_ids.shape[1:], 'audio': self.audio.shape[1:],
            'vision': self.vision.shape[1:]}


def label3_from_score(score: np.ndarray) -> np.ndarray:
  """(N,) int32: 0 where score < 0, 1 where score == 0, 2 where score > 0."""
  score = np.asarray(score)
  return np.where(score < 0, 0, np.where(score == 0, 1, 2)).astype(np.int32)


def label7_from_score(score: np.ndarray) -> np.ndarray:
  """(N,) int32: round(clip(score, -3, 3)) + 3 (numpy rounds halves to even, like the original)."""
  return (np.round(np.clip(np.asarray(score, np.float64), -3.0, 3.0)) + 3).astype(np.int32)


# ---------------------------------------------------------------------------- paths


def _get(cfg, name, default=None):
  if isinstance(cfg, Mapping):
    return cfg.get(name, default)
  return getattr(cfg, name, default)


def _setting_label(data_cfg) -> str:
  kind = 'aligned' if _get(data_cfg, 'aligned', False) else 'unaligned'
  return f"{_get(data_cfg, 'dataset', 'mosi')} {kind} ({_get(data_cfg, 'setting', 'iid')})"


def resolve_split_paths(data_cfg, task: str = 'binary') -> dict:
  """{'train': path, 'valid': path, 'test': path} for a data config (the `config.data` fields).

  `data.file` (non-empty) holds all three splits. Otherwise, under `data.dir`:
    iid            CMU-MOSI/Processed/{aligned,unaligned}_50.pkl (CMU-MOSEI/... for mosei)
    ood            OOD_MOSI/{binary,seven}/MOSI_{aligned,unaligned}_50.pkl (joblib)
    cross_dataset  MSA_cross_datasets/{mosi,mosei}.pkl: train/valid from data.dataset,
                   test from the other dataset's file
  """
  file = _get(data_cfg, 'file', '') or ''
  if file:
    return {s: os.path.abspath(os.path.expanduser(file)) for s in SPLITS}
  root = _get(data_cfg, 'dir', '') or ''
  dataset = _get(data_cfg, 'dataset', 'mosi')
  setting = _get(data_cfg, 'setting', 'iid')
  aligned = bool(_get(data_cfg, 'aligned', False))
  if dataset not in _DATASETS:
    raise DataError(f"config.data.dataset is {dataset!r}; expected one of {_DATASETS}")
  if setting not in _SETTINGS:
    raise DataError(f"config.data.setting is {setting!r}; expected one of {_SETTINGS}")
  if task not in TASKS:
    raise DataError(f"config.task is {task!r}; expected one of {TASKS}")
  if not root:
    raise DataError(
        'config.data.dir is empty: set --config.data.dir to the folder holding the MMSA '
        'pickles (CMU-MOSI/Processed/unaligned_50.pkl, ...), or --config.data.file to one '
        "pickle, or use --config.data.source=synthetic")
  root = os.path.abspath(os.path.expanduser(root))
  kind = 'aligned' if aligned else 'unaligned'
  if setting == 'iid':
    path = os.path.join(root, f'CMU-{dataset.upper()}', 'Processed', f'{kind}_50.pkl')
    return {s: path for s in SPLITS}
  if setting == 'ood':
    path = os.path.join(root, f'OOD_{dataset.upper()}', task, f'{dataset.upper()}_{kind}_50.pkl')
    return {s: path for s in SPLITS}
  if not aligned:
    raise DataError('config.data.setting=cross_dataset needs aligned data: set '
                    '--config.data.aligned=True (MSA_cross_datasets holds aligned features only)')
  other = 'mosei' if dataset == 'mosi' else 'mosi'
  source = os.path.join(root, 'MSA_cross_datasets', f'{dataset}.pkl')
  target = os.path.join(root, 'MSA_cross_datasets', f'{other}.pkl')
  return {'train': source, 'valid': source, 'test': target}


def resolve_path(data_cfg, task: str = 'binary', split: str = 'train') -> str:
  """Path of the file holding `split` for a data config (see `resolve_split_paths`)."""
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}: expected one of {SPLITS}')
  return resolve_split_paths(data_cfg, task)[split]


# ---------------------------------------------------------------------------- reading


def require_file(path: str, what: str = 'MMSA data file') -> None:
  """Raises DataError saying what to put where if `path` is not an existing file."""
  if not os.path.exists(path):
    raise DataError(
        f'{what} not found: expected {path}. Put the MMSA pickle there (a dict with '
        'train/valid/test splits of text_bert, audio, vision, regression_labels, '
        'classification_labels), or point --config.data.dir / --config.data.file at it')
  if os.path.isdir(path):
    raise DataError(f'{what} {path} is a directory; expected a pickle file')


def read_pickle(path: str, what: str = 'MMSA data file') -> Any:
  """Unpickles `path` (plain pickle, or a joblib file such as the OOD repartitions) through
  `safe_pickle`: a file that asks for anything beyond numpy arrays, numbers, strings, lists
  and dicts is refused before any of it runs, and one that declares an array its data cannot
  fill (larger than the file, say) before that array is allocated."""
  require_file(path, what)
  try:
    return safe_pickle.load(path)
  except safe_pickle.RefusedGlobal as e:
    raise DataError(
        f'{path}: refused to load: the file asks for {e.name}, which a data file may not use '
        '(allowed: numpy arrays, numbers, strings, lists, dicts); nothing from it was run'
    ) from None
  except safe_pickle.BadArray as e:
    raise DataError(
        f'{path}: refused to load: it declares {" ".join(str(e).split())[:300]}; nothing was '
        'allocated for it. The file is damaged or was not written as a data file: replace it '
        'with the original') from None
  except Exception as e:  # pylint: disable=broad-except
    detail = ' '.join(f'{type(e).__name__}: {e}'.split())[:200]
    raise DataError(f'{path}: not a readable pickle or joblib file ({detail})') from None


def _cfg_parts(cfg):
  """(data_cfg, task) from a full config (with .data and .task) or a data config."""
  data = _get(cfg, 'data', None)
  if data is not None:
    return data, _get(cfg, 'task', 'binary')
  return cfg, 'binary'


def load_mmsa(path_or_cfg, task: Optional[str] = None, *, aligned: Optional[bool] = None,
              labels_from_score: Optional[bool] = None,
              special: tokens.SpecialTokens = tokens.BERT) -> dict:
  """Loads and validates MMSA data; returns {'train': Split, 'valid': Split, 'test': Split}.

  Args:
    path_or_cfg: a pickle/joblib path, or a config (a full config with `.data` and `.task`,
      or the `config.data` part) resolved with `resolve_split_paths`.
    task: overrides the config's task (only the OOD layout depends on it).
    aligned: True uses text lengths as audio/vision lengths (aligned files), False requires
      audio_lengths/vision_lengths; None (default for a path) infers it from the file.
    labels_from_score: True derives label3 from the score (cross-dataset files); False reads
      classification_labels; None: from the config (cross_dataset) or, for a path, reads
      classification_labels when present.
    special: the special tokens of the vocabulary the texts were tokenised with (their
      [CLS] / [SEP] are checked); bert-base-uncased's by default.
  """
  if isinstance(path_or_cfg, (str, os.PathLike)):
    path = os.fspath(path_or_cfg)
    return splits_from_dict(read_pickle(path), source=path, aligned=aligned,
                            labels_from_score=labels_from_score, special=special)
  data_cfg, cfg_task = _cfg_parts(path_or_cfg)
  task = task or cfg_task
  paths = resolve_split_paths(data_cfg, task)
  if aligned is None:
    aligned = bool(_get(data_cfg, 'aligned', False))
  if labels_from_score is None:
    labels_from_score = _get(data_cfg, 'setting', 'iid') == 'cross_dataset'
  what = f'MMSA data file for {_setting_label(data_cfg)}'
  loaded = {}
  out = {}
  for split in SPLITS:
    path = paths[split]
    if path not in loaded:
      loaded[path] = read_pickle(path, what)
    out[split] = splits_from_dict(loaded[path], source=path, aligned=aligned,
                                  labels_from_score=labels_from_score, only=(split,),
                                  special=special)[split]
  return out


def splits_from_dict(data: Any, source: str = '<data>', *, aligned: Optional[bool] = None,
                     labels_from_score: Optional[bool] = None, only=SPLITS,
                     special: tokens.SpecialTokens = tokens.BERT) -> dict:
  """Validates an MMSA dict (as unpickled) and converts the splits named in `only`.

  See `load_mmsa` for `aligned`, `labels_from_score` and `special`.
  """
  if not isinstance(data, Mapping):
    raise DataError(f'{source}: expected a dict with keys {list(SPLITS)}, '
                    f'got {type(data).__name__}')
  out = {}
  for split in only:
    if split not in data:
      raise DataError(f"{source}: split '{split}' missing; expected keys {list(SPLITS)}, "
                      f'found {sorted(map(str, data.keys()))}')
    try:
      fields = validate.check_split(data[split], split, aligned=aligned,
                                    labels_from_score=labels_from_score, special=special)
    except DataError as e:
      raise DataError(f'{source}: {e}', split=e.split, field=e.field, index=e.index) from None
    out[split] = Split(**fields)
  return out


# ---------------------------------------------------------------------------- CLI


def summarize(splits: Mapping[str, Split]) -> str:
  """Human-readable summary per split: sizes, shapes, lengths, label distribution and the
  scale of the audio and vision features (saying when they are on raw scales)."""
  lines = []
  for name, s in splits.items():
    n = len(s)
    l3 = np.bincount(s.label3, minlength=3)
    l7 = np.bincount(s.label7, minlength=7)
    tl, al, vl = s.text_lengths, s.audio_mask.sum(1), s.vision_mask.sum(1)
    lines.append(f'{name}: N={n}  text {tuple(s.text_ids.shape[1:])}  audio '
                 f'{tuple(s.audio.shape[1:])}  vision {tuple(s.vision.shape[1:])}')
    lines.append(f'  lengths  text {tl.min()}-{tl.max()} (mean {tl.mean():.1f})  audio '
                 f'{int(al.min())}-{int(al.max())} (mean {al.mean():.1f})  vision '
                 f'{int(vl.min())}-{int(vl.max())} (mean {vl.mean():.1f})')
    lines.append(f'  score    min {s.score.min():+.2f} max {s.score.max():+.2f} '
                 f'mean {s.score.mean():+.2f}')
    lines.append('  label3   ' + '  '.join(
        f'{k}:{c} ({c / n:.0%})' for k, c in zip(('neg', 'neu', 'pos'), l3)))
    lines.append('  label7   ' + '  '.join(f'{k}:{c}' for k, c in enumerate(l7)))
    for m in ('audio', 'vision'):
      lines.append(standardize.describe_scale(
          m, standardize.scale_summary(getattr(s, m), getattr(s, f'{m}_mask'))))
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m cider_jax.data.mmsa',
      description='Validate an MMSA pickle and print a summary of its splits.')
  parser.add_argument('file', help='MMSA pickle or joblib file')
  group = parser.add_mutually_exclusive_group()
  group.add_argument('--aligned', dest='aligned', action='store_true', default=None,
                     help='use text lengths as audio/vision lengths')
  group.add_argument('--unaligned', dest='aligned', action='store_false',
                     help='require audio_lengths / vision_lengths')
  parser.add_argument('--labels-from-score', action='store_true', default=None,
                      help='derive the 3-class label from the score (cross-dataset files)')
  parser.add_argument('--tokenizer', metavar='DIR', default=None,
                      help='tokenizer or BERT folder (vocab.txt or tokenizer.json) the texts '
                      'were tokenised with; its [CLS] / [SEP] ids are checked (default: '
                      'bert-base-uncased\'s)')
  args = parser.parse_args(argv)
  try:
    special = tokens.from_tokenizer_dir(args.tokenizer) if args.tokenizer else tokens.BERT
  except (OSError, ValueError) as e:
    print(f'error: --tokenizer: {_one_line(e)}', file=sys.stderr)
    return 1
  try:
    splits = load_mmsa(args.file, aligned=args.aligned, labels_from_score=args.labels_from_score,
                       special=special)
  except DataError as e:
    print(f'error: {_one_line(e)}', file=sys.stderr)
    return 1
  except Exception as e:  # pylint: disable=broad-except
    print(f'error: {args.file}: {type(e).__name__}: {_one_line(e)}', file=sys.stderr)
    return 1
  print(f'{args.file}')
  print(summarize(splits))
  return 0


def _one_line(e: Exception) -> str:
  return ' '.join(str(e).split())


if __name__ == '__main__':
  raise SystemExit(main())
