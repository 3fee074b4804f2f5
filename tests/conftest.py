"""Shared test fixtures: small MMSA-format data written the way MMSA pickles are; one
persistent XLA compilation cache for the whole test session."""
import os
import shutil
import tempfile

import numpy as np
import pytest

_CACHE = []


def pytest_configure(config):
  """Programs compiled by one test and compiled again, identical, by another (the tiny model's
  train step under the same configuration, say) come from a cache that lives as long as the
  session (CIDER_JAX_TEST_XLA_CACHE=0: none)."""
  if os.environ.get('CIDER_JAX_TEST_XLA_CACHE', '1') == '0':
    return
  from cider_jax import parallel
  path = tempfile.mkdtemp(prefix='cider_jax_test_xla_')
  _CACHE.append(path)
  parallel.enable_compilation_cache(path)


def pytest_unconfigure(config):
  for path in _CACHE:
    shutil.rmtree(path, ignore_errors=True)


def make_mmsa_split(n, seed=0, text_len=50, audio_len=375, vision_len=500, audio_dim=5,
                    vision_dim=20, aligned=False):
  """One split dict in the MMSA pickle format (MOSI unaligned shapes by default)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, text_len + 1, n)
  ids = np.zeros((n, text_len))
  mask = np.zeros((n, text_len))
  for i, length in enumerate(lengths):
    ids[i, :length] = rng.integers(1000, 3000, length)
    ids[i, 0], ids[i, length - 1] = 101, 102
    mask[i, :length] = 1
  score = np.round(rng.uniform(-3, 3, n) * 3) / 3
  score[:2] = (0.0, 3.0)[:min(n, 2)]
  split = {
      'text_bert': np.stack([ids, mask, np.zeros_like(ids)], axis=1),
      'audio': rng.normal(size=(n, audio_len, audio_dim)),
      'vision': rng.normal(size=(n, vision_len, vision_dim)),
      'regression_labels': score,
      'classification_labels': np.where(score < 0, 0, np.where(score == 0, 1, 2)).astype(float),
      'raw_text': np.array([f'sentence {i}' for i in range(n)], dtype=object),
      'id': np.array([f'video{i}$_$1' for i in range(n)], dtype=object),
  }
  if not aligned:
    split['audio_lengths'] = rng.integers(1, audio_len + 1, n)
    split['vision_lengths'] = rng.integers(1, vision_len + 1, n)
  return split


def make_mmsa(sizes=(12, 5, 7), seed=0, **kwargs):
  """{train, valid, test} dict in the MMSA pickle format."""
  return {name: make_mmsa_split(n, seed=seed + k, **kwargs)
          for k, (name, n) in enumerate(zip(('train', 'valid', 'test'), sizes))}


@pytest.fixture
def mmsa_data():
  """Factory: mmsa_data(sizes=(12, 5, 7), seed=0, aligned=False, ...) -> MMSA dict."""
  return make_mmsa
