"""Class prototypes and the label prior from the train split (docs/model.md §5).

A sample's feature is [text | audio | vision]: the time-mean over valid positions of the
pretrained text encoder's output, of the audio frames and of the vision frames. A class
prototype is the mean feature of its train samples. Training uses the prototypes and the
class frequencies; evaluation gives every class the mean of all prototypes and a uniform
prior (`eval_constants`), so nothing at test time depends on test labels.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np


def _masked_time_mean(x, mask):
  """x (B, T, D), mask (B, T) → (B, D)."""
  m = mask[..., None].astype(np.float32)
  return (x * m).sum(1) / np.maximum(m.sum(1), 1.0)


def sample_features(encoder, encoder_vars, split, batch_size: int = 64,
                    stats=None) -> np.ndarray:
  """(N, Dl + Da + Dv) features of a split with the pretrained encoder (deterministic).

  stats: the audio / vision standardisation statistics (data/standardize.py) the model's
  inputs get; the time-means are then those of the standardised frames.
  """
  encode = jax.jit(lambda ids, mask, seg: encoder.apply(encoder_vars, ids, mask, seg,
                                                        deterministic=True))
  n = split.text_ids.shape[0]
  text = []
  for start in range(0, n, batch_size):
    sl = slice(start, start + batch_size)
    ids, mask, seg = split.text_ids[sl], split.text_mask[sl], split.text_segments[sl]
    pad = batch_size - ids.shape[0]
    if pad:  # fixed shapes: one compilation
      ids, mask, seg = (np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in (ids, mask, seg))
    h = np.asarray(encode(ids, mask, seg))[:batch_size - pad]
    text.append(_masked_time_mean(h, split.text_mask[sl]))
  text = np.concatenate(text)
  audio = _masked_time_mean(split.audio, split.audio_mask)
  vision = _masked_time_mean(split.vision, split.vision_mask)
  if stats is not None:
    # the mean of standardised frames is the standardised mean (0 where there is no frame)
    audio = _standardised_mean(audio, split.audio_mask, stats['audio_mean'], stats['audio_std'])
    vision = _standardised_mean(vision, split.vision_mask, stats['vision_mean'],
                                stats['vision_std'])
  return np.concatenate([text, audio, vision], axis=1).astype(np.float32)


def _standardised_mean(mean, mask, shift, scale):
  has_frames = (mask.sum(1) > 0)[:, None]
  return np.where(has_frames, (mean - shift) / scale, 0.0).astype(np.float32)


def class_prototypes(features: np.ndarray, labels: np.ndarray, num_classes: int):
  """(cls_feats (C, D), prior (C,)) = per-class mean feature and class frequency.

  A class with no train sample gets the mean of all samples (with a warning) and prior 0.
  """
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  feats = np.zeros((num_classes, features.shape[1]), np.float64)
  np.add.at(feats, labels, features)
  empty = counts == 0
  if empty.any():
    print(f'warning: classes {np.flatnonzero(empty).tolist()} have no train sample; their '
          'prototype is the mean of all samples', file=sys.stderr)
  feats = np.where(empty[:, None], features.mean(0, keepdims=True),
                   feats / np.maximum(counts, 1)[:, None])
  return feats.astype(np.float32), (counts / counts.sum()).astype(np.float32)


def eval_constants(cls_feats, num_classes: int):
  """Evaluation: every class gets the mean prototype; the prior is uniform."""
  mean = jnp.mean(jnp.asarray(cls_feats), axis=0, keepdims=True)
  return (jnp.broadcast_to(mean, (num_classes, mean.shape[1])),
          jnp.full((num_classes,), 1.0 / num_classes, jnp.float32))
