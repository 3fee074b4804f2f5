"""Bias vocabulary and counterfactual text (cider_jax/counterfactual.py)."""
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cider_jax import counterfactual as cf
from cider_jax import tokens
from tests.helpers.fixtures import MACI_FIXTURE, fixture_path

FIXTURE = fixture_path(MACI_FIXTURE)

CASES = [  # (fixture case, task, top_k, train label key)
    ('binary_top100', 'binary', 100, 'classification_labels'),
    ('seven_top100', 'seven', 100, 'seven_labels'),
    ('binary_top15', 'binary', 15, 'classification_labels'),
]


@pytest.fixture(scope='module')
def fixture():
  with np.load(FIXTURE) as z:
    return {k: z[k] for k in z.files}


def spec_bias_vocabulary(ids, labels, task, top_k, cv_threshold=0.1):
  """Straightforward per-word reading of docs/model.md §5 (a test oracle, loops and dicts)."""
  num_classes = 3 if task == 'binary' else 7
  used = (0, 2) if task == 'binary' else tuple(range(7))
  counts = {}  # insertion order = first occurrence (sample order, then position)
  for row, label in zip(np.asarray(ids).astype(int), labels):
    for token in row:
      if token in (0, 100, 101, 102, 103):
        continue
      counts.setdefault(token, [0] * num_classes)[int(label)] += 1
  chosen = []
  for token, c in counts.items():
    vals = np.array([c[i] for i in used], np.float32)
    mean = np.mean(vals)
    if mean == 0:
      continue  # a 3-class word seen only in neutral samples
    cv = np.std(vals) / mean
    if cv >= np.float32(cv_threshold):
      chosen.append((token, sum(c), cv))
  chosen.sort(key=lambda t: -t[1])  # stable: ties keep first-occurrence order
  chosen = chosen[:top_k]
  return (np.array([t[0] for t in chosen], np.int64), np.array([t[1] for t in chosen]),
          np.array([t[2] for t in chosen], np.float32))


# --------------------------------------------------------------------------- fixture

@pytest.mark.parametrize('case,task,top_k,label_key', CASES)
def test_bias_vocabulary_matches_original(fixture, case, task, top_k, label_key):
  ids = fixture['train/text_bert'][:, 0]  # float ids, as MMSA stores them
  stats = cf.bias_vocabulary_stats(ids, fixture[f'train/{label_key}'], task, top_k)
  np.testing.assert_array_equal(stats.ids, fixture[f'{case}/bias_ids'])
  np.testing.assert_array_equal(stats.counts, fixture[f'{case}/bias_counts'])
  # float32 arithmetic like the original: bit-identical coefficients of variation
  np.testing.assert_array_equal(stats.cv.astype(np.float64), fixture[f'{case}/bias_cv'])
  vocab = cf.bias_vocabulary(ids, fixture[f'train/{label_key}'], task, top_k)
  assert vocab.dtype == np.int32 and vocab.shape == (len(fixture[f'{case}/bias_ids']),)


@pytest.mark.parametrize('case,task,top_k,label_key', CASES)
def test_counterfactual_ids_match_original(fixture, case, task, top_k, label_key):
  vocab = cf.bias_vocabulary(fixture['train/text_bert'][:, 0], fixture[f'train/{label_key}'],
                             task, top_k)
  text_m = fixture[f'{case}/test_text_m_ids']
  expected = fixture[f'{case}/test_text_cf_ids']
  np.testing.assert_array_equal(cf.counterfactual_ids(text_m, vocab), expected)
  table = cf.bias_lookup_table(vocab, 4096)
  got = jax.jit(cf.counterfactual_ids_jax)(jnp.asarray(text_m, jnp.int32), table)
  np.testing.assert_array_equal(np.asarray(got), expected)


# ---------------------------------------------------------------- unseen splits

def _random_split(rng, n, length, vocab, task):
  lens = rng.integers(2, length + 1, n)
  ids = rng.integers(1000, 1000 + vocab, (n, length))
  ids[np.arange(length)[None] >= lens[:, None]] = 0
  ids[:, 0] = 101
  ids[np.arange(n), lens - 1] = 102
  ids[rng.random((n, length)) < 0.05] = 100  # some [UNK]
  labels = rng.integers(0, 3 if task == 'binary' else 7, n)
  return ids, labels


@pytest.mark.parametrize('task', ['binary', 'seven'])
@pytest.mark.parametrize('seed', range(4))
def test_bias_vocabulary_matches_spec_on_random_splits(task, seed):
  rng = np.random.default_rng(seed)
  ids, labels = _random_split(rng, 150, 16, 60 + 40 * seed, task)
  for top_k in (5, 30, 1000):
    got = cf.bias_vocabulary_stats(ids, labels, task, top_k)
    want = spec_bias_vocabulary(ids, labels, task, top_k)
    np.testing.assert_array_equal(got.ids, want[0])
    np.testing.assert_array_equal(got.counts, want[1])
    np.testing.assert_array_equal(got.cv, want[2])


@settings(max_examples=60, deadline=None)
@given(data=st.data(), task=st.sampled_from(['binary', 'seven']),
       top_k=st.integers(0, 12), threshold=st.sampled_from([0.0, 0.1, 0.3, 1.0]))
def test_bias_vocabulary_property(data, task, top_k, threshold):
  n = data.draw(st.integers(1, 12))
  # a tiny vocabulary (ids 98..106, specials among them) makes ties and shared words common
  ids = data.draw(hnp.arrays(np.int64, (n, 6), elements=st.integers(98, 106)))
  labels = data.draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, 2 if task == 'binary'
                                                                      else 6)))
  got = cf.bias_vocabulary_stats(ids, labels, task, top_k, threshold)
  want = spec_bias_vocabulary(ids, labels, task, top_k, threshold)
  np.testing.assert_array_equal(got.ids, want[0])
  np.testing.assert_array_equal(got.counts, want[1])
  assert not set(got.ids.tolist()) & set(tokens.BERT.ids)


# ---------------------------------------------------------------- edge cases by hand

def test_neutral_only_word_is_not_a_bias_word():
  # word 7: neg 2, pos 0 (cv 1); word 8: only in neutral samples; word 9: neg 1, pos 1 (cv 0)
  ids = np.array([[101, 7, 7, 9, 102], [101, 8, 8, 8, 102], [101, 9, 0, 0, 0]])
  labels = np.array([0, 1, 2])
  stats = cf.bias_vocabulary_stats(ids, labels, 'binary', top_k=10)
  np.testing.assert_array_equal(stats.ids, [7])
  np.testing.assert_array_equal(stats.counts, [2])
  np.testing.assert_allclose(stats.cv, [1.0])
  # The original reuses the cv of the previous word of its dictionary (first-occurrence
  # order). Above, word 8 follows word 9 (cv 0): still no candidate. Below, the order is
  # 7 (cv 1), 8 (neutral only: inherits cv 1, 3 occurrences), 9 (neg 1, pos 1: cv 0).
  ids2 = np.array([[101, 7, 7, 102], [101, 8, 8, 8], [101, 9, 0, 0], [101, 9, 0, 0]])
  labels2 = np.array([0, 1, 2, 0])
  stale = cf.bias_vocabulary_stats(ids2, labels2, 'binary', 10, reproduce_stale_cv=True)
  np.testing.assert_array_equal(stale.ids, [8, 7])
  np.testing.assert_allclose(stale.cv, [1.0, 1.0])
  np.testing.assert_array_equal(cf.bias_vocabulary(ids2, labels2, 'binary', 10), [7])
  np.testing.assert_array_equal(
      cf.bias_vocabulary(ids, labels, 'binary', 10, reproduce_stale_cv=True), [7])


def test_stale_cv_fails_like_the_original_when_first_word_is_neutral_only():
  ids = np.array([[101, 8, 102], [101, 7, 102]])
  with pytest.raises(ValueError, match='neutral'):
    cf.bias_vocabulary_stats(ids, np.array([1, 0]), 'binary', reproduce_stale_cv=True)


def test_seven_class_uses_all_seven_counts_and_ties_by_first_occurrence():
  # word 5 appears once in each of classes 0..6 (cv 0, not a bias word although the most
  # frequent); words 6 and 4 appear twice each, only in class 3 (counts (0,0,0,2,0,0,0):
  # mean 2/7, std 2·sqrt(6)/7, cv sqrt(6)); equal totals, 6 occurs first -> first.
  ids = np.array([[5, 6, 6, 4, 4]] + [[5, 0, 0, 0, 0]] * 6)
  labels = np.array([3, 0, 1, 2, 4, 5, 6])
  np.testing.assert_array_equal(cf.bias_vocabulary(ids, labels, 'seven'), [6, 4])


def test_top_k_and_empty_split():
  ids = np.array([[101, 0, 102, 103, 100]])
  assert cf.bias_vocabulary(ids, np.array([0]), 'binary').shape == (0,)
  ids = np.array([[11, 12, 12, 13, 13, 13]])
  np.testing.assert_array_equal(cf.bias_vocabulary(ids, np.array([0]), 'binary', top_k=2),
                                [13, 12])


def test_input_errors():
  ids = np.array([[101, 7, 102]])
  with pytest.raises(ValueError, match='task'):
    cf.bias_vocabulary(ids, np.array([0]), 'five')
  with pytest.raises(ValueError, match='labels'):
    cf.bias_vocabulary(ids, np.array([3]), 'binary')
  with pytest.raises(ValueError, match='labels'):
    cf.bias_vocabulary(ids, np.array([0, 1]), 'binary')
  with pytest.raises(ValueError, match='integral'):
    cf.bias_vocabulary(ids + 0.5, np.array([0]), 'binary')
  with pytest.raises(ValueError, match=r'\(N, L\)'):
    cf.bias_vocabulary(ids[0], np.array([0]), 'binary')
  with pytest.raises(ValueError, match=r'\[0, 50\)'):
    cf.bias_lookup_table(np.array([5, 50]), 50)


# ------------------------------------------------------------------ counterfactual text

def test_counterfactual_ids_by_hand():
  ids = np.array([[101, 7, 8, 100, 9, 102, 0], [101, 103, 9, 9, 102, 0, 0]], np.float32)
  got = cf.counterfactual_ids(ids, np.array([9]))
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, [[101, 103, 103, 100, 9, 102, 0],
                                      [101, 103, 9, 9, 102, 0, 0]])


@pytest.mark.parametrize('dtype', [jnp.int32, jnp.float32])
def test_jax_counterfactual_equals_numpy(dtype):
  rng = np.random.default_rng(0)
  vocab = rng.choice(np.arange(104, 300), 40, replace=False)
  # ids beyond the table (>= 256) and below 0 must not index out of range: -> [MASK]
  ids = rng.integers(-3, 400, (8, 30))
  ids[:, :5] = [0, 100, 101, 102, 103]
  table = cf.bias_lookup_table(vocab[vocab < 256], 256)
  got = jax.jit(cf.counterfactual_ids_jax)(jnp.asarray(ids, dtype), table)
  want = cf.counterfactual_ids(ids, vocab[vocab < 256])
  assert got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got).astype(np.int64), want)
  assert np.all(np.asarray(got)[ids >= 256] == 103)


def test_jax_counterfactual_keeps_specials_with_a_small_table():
  table = cf.bias_lookup_table(np.array([3]), 64)  # specials 100..103 lie outside the table
  got = cf.counterfactual_ids_jax(jnp.array([[101, 3, 4, 100, 102, 103, 0]]), table)
  np.testing.assert_array_equal(np.asarray(got), [[101, 3, 103, 100, 102, 103, 0]])


class _TrainSplit:
  """The two things the bias vocabulary reads from a train split."""

  def __init__(self, text_ids, label3):
    self.text_ids, self._label3 = text_ids, label3

  def labels(self, task):
    assert task == 'binary'
    return self._label3


def test_cached_bias_vocab_is_recomputed_for_other_maci_settings(capsys):
  from cider_jax import run_state
  from configs import quickstart
  # word 1000 only in positives (cv = sqrt(2)/... large), word 2000 evenly split (cv 0)
  ids = np.array([[101, 1000, 2000, 102], [101, 1000, 2000, 102],
                  [101, 2000, 3000, 102], [101, 2000, 3000, 102]], np.int32)
  split = _TrainSplit(ids, np.array([2, 2, 0, 0], np.int32))
  config = quickstart.get_config()
  config.maci.top_k, config.maci.cv_threshold = 10, 0.1
  cached = {'cls_feats': np.zeros((3, 4), np.float32), 'prior': np.ones(3, np.float32) / 3,
            'bias_vocab': np.array([1000, 3000], np.int32),
            'maci_top_k': np.asarray(10, np.int64),
            'maci_cv_threshold': np.asarray(0.1, np.float32)}
  assert run_state.bias_vocab_matches(config, cached)
  assert run_state.with_bias_vocab(config, cached, split) is cached  # same settings: the cache
  config.maci.top_k = 1
  got = run_state.with_bias_vocab(config, cached, split)
  assert got['bias_vocab'].tolist() == [1000]  # 1000 and 3000 tie on count; first seen wins
  assert int(got['maci_top_k']) == 1 and got['cls_feats'] is cached['cls_feats']
  assert 'recomputed for maci.top_k=1' in capsys.readouterr().out
  legacy = {k: v for k, v in cached.items() if not k.startswith('maci_')}
  assert not run_state.bias_vocab_matches(config, legacy)  # unrecorded settings are not trusted
  assert run_state.with_bias_vocab(config, legacy, split)['bias_vocab'].tolist() == [1000]
