"""Per-dimension standardisation of the audio and vision features (`data.standardize`).

Features a user extracts (openSMILE, OpenFace, …) come on raw scales, one dimension in the
hundreds and the next below one; the MMSA files are pre-scaled. With `data.standardize`
(default) every audio and vision dimension is shifted and scaled by its mean and standard
deviation over the valid frames of the **train** split (padding excluded):

  x' = (x − mean) / std     on valid frames; padded frames are left as they are

The statistics are train-split constants (saved in <workdir>/constants.npz with the class
prototypes), so validation, test and new samples at prediction get the train statistics,
never their own. A dimension whose train values are constant gets std 1 (it is only
shifted). `data.standardize=False` stores mean 0 and std 1, which leave the inputs exactly
as they are (the original's raw inputs).

  stats = statistics(splits['train'])   # {'audio_mean', 'audio_std', 'vision_mean', 'vision_std'}
"""
from typing import Dict

import numpy as np

MODALITIES = ('audio', 'vision')
KEYS = tuple(f'{m}_{s}' for m in MODALITIES for s in ('mean', 'std'))
_MIN_STD = 1e-6      # below this (relative to the dimension's scale) a dimension is constant
_CHUNK = 512         # examples per pass (bounds the temporary memory on MOSEI-size splits)


def masked_moments(x: np.ndarray, mask: np.ndarray):
  """(mean (D,), std (D,), count) of x (N, T, D) over the frames where mask (N, T) > 0,
  accumulated in float64. No valid frame: mean 0, std 0, count 0."""
  total = np.zeros(x.shape[-1], np.float64)
  total_sq = np.zeros(x.shape[-1], np.float64)
  count = 0.0
  for start in range(0, x.shape[0], _CHUNK):
    xs = x[start:start + _CHUNK].astype(np.float64)
    m = (mask[start:start + _CHUNK] > 0)
    xs = xs[m]                                   # (valid frames, D)
    total += xs.sum(0)
    count += xs.shape[0]
  if count == 0:
    return np.zeros_like(total), np.zeros_like(total), 0
  mean = total / count
  for start in range(0, x.shape[0], _CHUNK):    # second pass: no cancellation in the variance
    xs = x[start:start + _CHUNK].astype(np.float64)[mask[start:start + _CHUNK] > 0]
    total_sq += ((xs - mean) ** 2).sum(0)
  return mean, np.sqrt(total_sq / count), int(count)


def statistics(split) -> Dict[str, np.ndarray]:
  """{'audio_mean', 'audio_std', 'vision_mean', 'vision_std'} (D,) float32 of a split (an
  `mmsa.Split`, or anything with audio / audio_mask / vision / vision_mask arrays)."""
  out = {}
  for m in MODALITIES:
    mean, std, _ = masked_moments(getattr(split, m), getattr(split, f'{m}_mask'))
    constant = std <= _MIN_STD * np.maximum(1.0, np.abs(mean))
    out[f'{m}_mean'] = mean.astype(np.float32)
    out[f'{m}_std'] = np.where(constant, 1.0, std).astype(np.float32)
  return out


def identity(audio_dim: int, vision_dim: int) -> Dict[str, np.ndarray]:
  """Mean 0, std 1: the inputs exactly as they are (data.standardize=False)."""
  return {'audio_mean': np.zeros(audio_dim, np.float32),
          'audio_std': np.ones(audio_dim, np.float32),
          'vision_mean': np.zeros(vision_dim, np.float32),
          'vision_std': np.ones(vision_dim, np.float32)}


def is_identity(stats) -> bool:
  return all(np.all(np.asarray(stats[f'{m}_mean']) == 0) and
             np.all(np.asarray(stats[f'{m}_std']) == 1) for m in MODALITIES)


# ---------------------------------------------------------------------------- scale report

RAW_SCALE_STD = 10.0    # a dimension spread wider than this is not on a standardised scale
RAW_SCALE_MEAN = 10.0   # nor one centred this far from 0
RAW_SCALE_RATIO = 100.0  # nor features whose dimensions' spreads differ by more than this


def scale_summary(x: np.ndarray, mask: np.ndarray) -> dict:
  """Per-dimension scale of x (N, T, D) over valid frames: ranges of the dimensions' means,
  standard deviations and largest magnitudes, and whether they look like raw scales."""
  mean, std, count = masked_moments(x, mask)
  if count == 0:
    return {'frames': 0, 'raw': False}
  absmax = np.zeros(x.shape[-1])
  for start in range(0, x.shape[0], _CHUNK):
    xs = np.abs(x[start:start + _CHUNK][mask[start:start + _CHUNK] > 0])
    if xs.size:
      absmax = np.maximum(absmax, xs.max(0))
  spread = std[std > _MIN_STD]
  ratio = float(spread.max() / spread.min()) if spread.size else 1.0
  raw = bool(std.max() > RAW_SCALE_STD or np.abs(mean).max() > RAW_SCALE_MEAN
             or ratio > RAW_SCALE_RATIO)
  return {'frames': count, 'mean': (float(mean.min()), float(mean.max())),
          'std': (float(std.min()), float(std.max())), 'absmax': float(absmax.max()),
          'constant_dims': int((std <= _MIN_STD * np.maximum(1.0, np.abs(mean))).sum()),
          'std_ratio': ratio, 'raw': raw}


def describe_scale(name: str, s: dict) -> str:
  """One line for the validator, e.g. 'audio scale  mean -3.1…376  std 0.01…95 … raw scales'."""
  if not s['frames']:
    return f'  {name} scale  no valid frames'
  line = (f'  {name} scale  per-dimension mean {s["mean"][0]:.3g} to {s["mean"][1]:.3g}, std '
          f'{s["std"][0]:.3g} to {s["std"][1]:.3g}, |max| {s["absmax"]:.3g}')
  if s['constant_dims']:
    line += f', {s["constant_dims"]} constant'
  if s['raw']:
    line += (' — raw scales: training standardises them with the train split\'s statistics '
             '(data.standardize=True, the default)')
  return line
