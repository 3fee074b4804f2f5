"""Field-by-field checks of one MMSA split (see cider_jax.data.mmsa for the format).

`check_split` turns the raw dict of one split into the typed arrays of `mmsa.Split`, or
raises `DataError` naming the split, the field, the first offending example and what was
expected.
"""
from typing import Any, Mapping, Optional

import numpy as np

from cider_jax import tokens

_REQUIRED = ('text_bert', 'audio', 'vision', 'regression_labels')


class DataError(ValueError):
  """A data file or config that cannot be used; the message says what and where.

  Attributes `split`, `field` and `index` (example index) are set where they apply.
  """

  def __init__(self, message: str, *, split: Optional[str] = None,
               field: Optional[str] = None, index: Optional[int] = None):
    super().__init__(message)
    self.split, self.field, self.index = split, field, index


def _fail(split, field, problem, expected=None, index=None):
  where = f"split '{split}', field '{field}'"
  if index is not None:
    where += f', example {index}'
  msg = f'{where}: {problem}'
  if expected:
    msg += f'; expected {expected}'
  raise DataError(msg, split=split, field=field, index=index)


def _first_bad(bad: np.ndarray) -> int:
  """Index along axis 0 of the first example with any True in `bad` (N, ...)."""
  per_example = bad.reshape(bad.shape[0], -1).any(axis=1)
  return int(np.argmax(per_example))


_is_text = np.frompyfunc(lambda v: isinstance(v, (str, bytes)), 1, 1)


def _numeric(split, field, value, rank, what):
  try:
    arr = np.asarray(value)
  except Exception as e:  # pylint: disable=broad-except
    _fail(split, field, f'cannot be read as an array ({type(e).__name__})', what)
  if arr.dtype == object:
    text = np.asarray(_is_text(arr), dtype=bool)
    if text.any():  # numbers written as text ('12') are not taken for numbers
      index = _first_bad(text) if arr.ndim else None
      _fail(split, field, f'holds text ({arr[text].flat[0]!r:.40}), not numbers', what, index)
    try:
      arr = arr.astype(np.float64)
    except (TypeError, ValueError):
      _fail(split, field, 'holds non-numeric values', what)
  if arr.dtype.kind in 'US':
    _fail(split, field, f'holds text (dtype {arr.dtype}), not numbers', what)
  if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
    _fail(split, field, f'has dtype {arr.dtype}', what)
  if arr.ndim != rank:
    _fail(split, field, f'has rank {arr.ndim} (shape {arr.shape})', what)
  return arr


def _integral(split, field, arr, what):
  """int64 copy of integral values (MMSA stores ids and labels as floats)."""
  if np.issubdtype(arr.dtype, np.floating):
    bad = ~np.isfinite(arr) | (arr != np.round(arr))
    if bad.any():
      i = _first_bad(bad)
      value = np.asarray(arr[i])[np.asarray(bad[i])].flat[0]
      _fail(split, field, f'non-integer value {value!r}', what, i)
  return arr.astype(np.int64)


def _features(split, field, value):
  """(N, T, D) float32 with -inf set to 0; NaN or +inf is an error."""
  arr = _numeric(split, field, value, 3, 'a (N, frames, dim) float array')
  arr = np.array(arr, dtype=np.float32)  # copy: never modify the caller's data
  arr[np.isneginf(arr)] = 0.0
  bad = ~np.isfinite(arr)
  if bad.any():
    i = _first_bad(bad)
    kind = 'NaN' if np.isnan(arr[i]).any() else '+inf'
    _fail(split, field, f'contains {kind}', 'finite values (-inf is allowed and becomes 0)', i)
  return arr


def _strings(split, field, value, n, default_fmt):
  """(N,) object array of str: one entry per example (an (N, 1) array is taken as (N,))."""
  if value is None:
    return np.array([default_fmt.format(i) for i in range(n)], dtype=object)
  expected = f'one entry per example ({n}, as text_bert)'
  try:
    arr = np.asarray(value, dtype=object)
  except Exception as e:  # pylint: disable=broad-except
    _fail(split, field, f'cannot be read as an array ({type(e).__name__})', expected)
  if arr.ndim == 0:
    _fail(split, field, f'is a single {type(value).__name__}, not a list', expected)
  if arr.shape[0] != n:
    _fail(split, field, f'has {arr.shape[0]} entries but text_bert has {n} examples',
          f'{n} entries')
  if arr.ndim > 1:
    if arr[0].size != 1:
      _fail(split, field, f'has shape {arr.shape}', expected)
    arr = arr.reshape(n)
  return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in arr], dtype=object)


def _lengths(split, field, value, n, frames):
  arr = _numeric(split, field, value, 1, '(N,) integer lengths')
  if arr.shape[0] != n:
    _fail(split, field, f'has {arr.shape[0]} entries but text_bert has {n} examples',
          f'{n} entries')
  arr = _integral(split, field, arr, 'integer lengths')
  bad = (arr < 1) | (arr > frames)
  if bad.any():
    i = int(np.argmax(bad))
    _fail(split, field, f'length {arr[i]} outside [1, {frames}]',
          f'1 <= length <= {frames} (the array length)', i)
  return arr


def _prefix_mask(lengths: np.ndarray, frames: int) -> np.ndarray:
  return (np.arange(frames)[None, :] < lengths[:, None]).astype(np.float32)


def _check_cls_sep(split, text_ids, lengths, special):
  """Every text starts with [CLS] and its last attended token (length - 1) is [SEP]."""
  layout = (f'each text [CLS] (id {special.cls}) ... [SEP] (id {special.sep}) then padding, the '
            'attention mask 1 from [CLS] to [SEP]')
  bad = text_ids[:, 0] != special.cls
  if bad.any():
    i = int(np.argmax(bad))
    _fail(split, 'text_bert', f'first token is id {text_ids[i, 0]}, not [CLS] (id {special.cls})',
          layout, i)
  last = text_ids[np.arange(len(lengths)), lengths - 1]
  bad = last != special.sep
  if bad.any():
    i = int(np.argmax(bad))
    _fail(split, 'text_bert', f'last attended token (position {lengths[i] - 1}, text length '
          f'{lengths[i]}) is id {last[i]}, not [SEP] (id {special.sep})', layout, i)


def check_split(raw: Any, split: str, *, aligned: Optional[bool] = None,
                labels_from_score: Optional[bool] = None,
                special: tokens.SpecialTokens = tokens.BERT) -> dict:
  """Validates one split dict; returns the keyword arguments of `mmsa.Split`.

  aligned: True uses text lengths for audio/vision; False requires audio_lengths and
    vision_lengths; None uses the lengths when the file has them, text lengths otherwise.
  labels_from_score: True derives label3 from the score; False requires
    classification_labels; None reads them when present, else derives from the score.
  special: the [CLS] / [SEP] ids every text must start / end with (bert-base-uncased's by
    default).
  """
  if not isinstance(raw, Mapping):
    raise DataError(f"split '{split}': expected a dict of arrays, got {type(raw).__name__}",
                    split=split)
  for key in _REQUIRED:
    if key not in raw:
      _fail(split, key, 'missing', f'keys {list(_REQUIRED)} (found {sorted(map(str, raw))})')
  text_ids, mask, segments = _text(split, raw['text_bert'], special)
  n = text_ids.shape[0]
  features = {field: _features(split, field, raw[field]) for field in ('audio', 'vision')}
  _check_frames(split, n, features)
  audio, vision = features['audio'], features['vision']
  lengths = _frame_lengths(raw, split, aligned, mask.sum(axis=1).astype(np.int64), features)
  score = _score(split, raw['regression_labels'], n)
  label3 = _label3(raw, split, score, labels_from_score)
  label7 = np.round(np.clip(score.astype(np.float64), -3, 3)) + 3
  return dict(
      text_ids=text_ids.astype(np.int32),
      text_mask=mask,
      text_segments=segments.astype(np.int32),
      audio=audio,
      audio_mask=_prefix_mask(lengths['audio'], audio.shape[1]),
      vision=vision,
      vision_mask=_prefix_mask(lengths['vision'], vision.shape[1]),
      score=score,
      label3=label3.astype(np.int32),
      label7=label7.astype(np.int32),
      ids=_strings(split, 'id', raw.get('id'), n, split + '_{:d}'),
      raw_text=_strings(split, 'raw_text', raw.get('raw_text'), n, ''),
  )


def _text(split, value, special):
  """(ids (N, L) int64, attention mask (N, L) float32, segments (N, L) int64) of text_bert."""
  text = _numeric(split, 'text_bert', value, 3, '(N, 3, L): ids, mask, segments')
  if text.shape[0] == 0:
    _fail(split, 'text_bert', 'the split is empty (0 examples)', 'at least one example')
  if text.shape[1] != 3 or text.shape[2] < 1:
    _fail(split, 'text_bert', f'has shape {text.shape}', '(N, 3, L): ids, mask, segments')
  text_ids = _integral(split, 'text_bert', text[:, 0], 'integer token ids in text_bert[:, 0]')
  if (text_ids < 0).any():
    i = _first_bad(text_ids < 0)
    _fail(split, 'text_bert', 'negative token id', 'non-negative token ids in text_bert[:, 0]', i)
  mask = text[:, 1]
  bad = (mask != 0) & (mask != 1)
  if bad.any():
    _fail(split, 'text_bert', 'attention mask value not 0/1', 'text_bert[:, 1] in {0, 1}',
          _first_bad(bad))
  mask = mask.astype(np.float32)
  bad = (mask[:, 0] != 1)[:, None] | (np.diff(mask, axis=1) > 0)
  if bad.any():
    _fail(split, 'text_bert', 'attention mask is not a prefix of ones starting at [CLS]',
          'text_bert[:, 1] = 1,...,1,0,...,0 with at least one 1', _first_bad(bad))
  segments = _integral(split, 'text_bert', text[:, 2], 'integer segment ids in text_bert[:, 2]')
  if (segments < 0).any():
    _fail(split, 'text_bert', 'negative segment id', 'non-negative segment ids',
          _first_bad(segments < 0))
  _check_cls_sep(split, text_ids, mask.sum(axis=1).astype(np.int64), special)
  return text_ids, mask, segments


def _check_frames(split, n, features):
  """features {'audio', 'vision'}: (N, frames, dim) arrays, n examples and no empty axis."""
  for field, arr in features.items():
    if arr.shape[0] != n:
      _fail(split, field, f'has {arr.shape[0]} examples but text_bert has {n}', f'{n} examples')
    if arr.shape[1] < 1 or arr.shape[2] < 1:
      _fail(split, field, f'has shape {arr.shape}', '(N, frames >= 1, dim >= 1)')


def _frame_lengths(raw, split, aligned, text_lengths, features):
  """{'audio', 'vision'}: (N,) valid frames, from the file or (aligned) the text lengths."""
  has_lengths = [k in raw for k in ('audio_lengths', 'vision_lengths')]
  use_file_lengths = all(has_lengths) if aligned is None else not aligned
  if aligned is None and any(has_lengths) and not all(has_lengths):
    missing = 'vision_lengths' if has_lengths[0] else 'audio_lengths'
    _fail(split, missing, 'missing while the other lengths field is present',
          'both audio_lengths and vision_lengths (unaligned) or neither (aligned)')
  lengths = {}
  for field, arr in features.items():
    key = f'{field}_lengths'
    if use_file_lengths:
      if key not in raw:
        _fail(split, key, 'missing', 'per-example lengths for unaligned data')
      lengths[field] = _lengths(split, key, raw[key], len(text_lengths), arr.shape[1])
    else:
      too_long = text_lengths > arr.shape[1]
      if too_long.any():
        i = int(np.argmax(too_long))
        _fail(split, key, f'absent, and text length {text_lengths[i]} exceeds the {arr.shape[1]} '
              f'{field} frames', f'{key} (unaligned data) or {field} frames >= text length', i)
      lengths[field] = text_lengths
  return lengths


def _score(split, value, n):
  """(N,) float32 sentiment scores in [-3, 3]."""
  score = _numeric(split, 'regression_labels', value, 1, '(N,) float scores')
  if score.shape[0] != n:
    _fail(split, 'regression_labels', f'has {score.shape[0]} entries but text_bert has {n}',
          f'{n} entries')
  score = score.astype(np.float32)
  bad = ~np.isfinite(score) | (score < -3) | (score > 3)
  if bad.any():
    i = int(np.argmax(bad))
    _fail(split, 'regression_labels', f'score {score[i]!r} outside [-3, 3]', 'scores in [-3, 3]', i)
  return score


def _label3(raw, split, score, labels_from_score):
  """(N,) 3-class labels: classification_labels, or derived from the score."""
  if labels_from_score is None:
    labels_from_score = 'classification_labels' not in raw
  if labels_from_score:
    return np.where(score < 0, 0, np.where(score == 0, 1, 2))
  if 'classification_labels' not in raw:
    _fail(split, 'classification_labels', 'missing', '(N,) labels in {0, 1, 2}')
  n = score.shape[0]
  label3 = _numeric(split, 'classification_labels', raw['classification_labels'], 1,
                    '(N,) labels in {0, 1, 2}')
  if label3.shape[0] != n:
    _fail(split, 'classification_labels', f'has {label3.shape[0]} entries but text_bert has '
          f'{n}', f'{n} entries')
  label3 = _integral(split, 'classification_labels', label3, 'labels in {0, 1, 2}')
  bad = (label3 < 0) | (label3 > 2)
  if bad.any():
    i = int(np.argmax(bad))
    _fail(split, 'classification_labels', f'label {label3[i]} out of range',
          'labels in {0, 1, 2}', i)
  return label3
