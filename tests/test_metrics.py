"""Accuracy / F1 family, AUILC and tau selection (cider_jax/metrics.py)."""
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cider_jax import metrics

LOG = np.log


def reference_weighted_f1(y_true, y_pred, weights=None):
  """Independent weighted F1: per class precision and recall, F1 = 2PR/(P+R), support-weighted."""
  y_true, y_pred = list(map(int, y_true)), list(map(int, y_pred))
  w = [1.0] * len(y_true) if weights is None else list(map(float, weights))
  total, score = 0.0, 0.0
  for c in sorted(set(y_true) | set(y_pred)):
    tp = sum(wi for t, p, wi in zip(y_true, y_pred, w) if t == c and p == c)
    predicted = sum(wi for p, wi in zip(y_pred, w) if p == c)
    support = sum(wi for t, wi in zip(y_true, w) if t == c)
    precision = tp / predicted if predicted else 0.0
    recall = tp / support if support else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    score += f1 * support
    total += support
  return score / total


# ------------------------------------------------------------------- hand-computed

# 3-class case. Rows: true label, probabilities (neg, neu, pos), argmax, Has0 prediction
#   0: y 0  (.7 .2 .1)  pred 0  has0 neg          3: y 2  (.1 .2 .7)  pred 2  has0 pos
#   1: y 0  (.2 .1 .7)  pred 2  has0 pos          4: y 2  (.1 .6 .3)  pred 1  has0 pos
#   2: y 1  (.1 .3 .6)  pred 2  has0 pos          5: y 2  (.5 .3 .2)  pred 0  has0 neg
HAND_PROBS = np.array([[.7, .2, .1], [.2, .1, .7], [.1, .3, .6], [.1, .2, .7], [.1, .6, .3],
                       [.5, .3, .2]])
HAND_LABELS = np.array([0, 0, 1, 2, 2, 2])
HAND_EXPECTED = {
    # rows 0 and 3 right: 2/6
    'Acc_3': 1 / 3,
    # per class F1 = 2TP/(2TP+FP+FN): neg TP1 FP1 FN1 -> 1/2; neu TP0 -> 0;
    # pos TP1 FP2 FN2 -> 1/3; weighted by support (2, 1, 3): (2·1/2 + 0 + 3·1/3)/6 = 1/3
    'F1_3': 1 / 3,
    # truth neg,neg,pos,pos,pos,pos (neutral counts as positive) vs neg,pos,pos,pos,pos,neg
    'Has0_acc_2': 4 / 6,
    # neg TP1 FP1 FN1 -> 1/2 (support 2); pos TP3 FP1 FN1 -> 3/4 (support 4): (1 + 3)/6
    'Has0_F1': 2 / 3,
    # neutral row 2 removed; rows 0, 3 right, row 4 predicts neutral (an error): 2/5
    'Non0_acc_2': 2 / 5,
    # neg TP1 FP1 FN1 -> 1/2 (support 2); pos TP1 FP1 FN2 -> 2/5 (support 3): (1 + 1.2)/5
    'Non0_F1': 0.44,
}


def test_binary_metrics_by_hand():
  got = metrics.classification_metrics(LOG(HAND_PROBS), HAND_LABELS, 'binary')
  assert set(got) == set(metrics.METRIC_NAMES['binary'])
  for name, value in HAND_EXPECTED.items():
    assert got[name] == pytest.approx(value, abs=1e-12), name


def test_padded_examples_are_ignored():
  # two padded rows with labels/scores that would change every metric if they counted
  probs = np.concatenate([HAND_PROBS, [[.9, .05, .05], [.05, .9, .05]]])
  labels = np.concatenate([HAND_LABELS, [2, 0]])
  valid = np.array([1, 1, 1, 1, 1, 1, 0, 0])
  got = metrics.classification_metrics(LOG(probs), labels, 'binary', valid)
  for name, value in HAND_EXPECTED.items():
    assert got[name] == pytest.approx(value, abs=1e-12), name


def test_seven_metrics_by_hand():
  # labels 3 3 0 6, predictions 3 2 0 6: 3 of 4 right. F1: class 3 TP1 FN1 -> 2/3 (support
  # 2), classes 0 and 6 -> 1 (support 1 each), class 2 support 0: (4/3 + 2)/4 = 5/6.
  logp = np.full((4, 7), -5.0)
  logp[np.arange(4), [3, 2, 0, 6]] = -0.1
  got = metrics.classification_metrics(logp, np.array([3, 3, 0, 6]), 'seven')
  assert set(got) == {'Acc_7', 'F1_7'}  # the original reports no 2-class metrics here
  assert got['Acc_7'] == pytest.approx(0.75)
  assert got['F1_7'] == pytest.approx(5 / 6)


def test_has0_and_non0_semantics():
  # a neutral sample predicted negative is a Has0 error, predicted positive is right
  # (neutral counts as positive); for Non0 neutral samples do not count at all.
  logp = LOG(np.array([[.5, .4, .1], [.1, .4, .5]]))
  got = metrics.classification_metrics(logp, np.array([1, 1]), 'binary')
  assert got['Has0_acc_2'] == 0.5
  assert np.isnan(got['Non0_acc_2']) and np.isnan(got['Non0_F1'])
  # Has0 ignores the neutral score even when it is the largest; Non0 does not
  logp = LOG(np.array([[.1, .8, .1 + 1e-3]]))
  got = metrics.classification_metrics(logp, np.array([2]), 'binary')
  assert got['Has0_acc_2'] == 1.0 and got['Non0_acc_2'] == 0.0 and got['Acc_3'] == 0.0
  # Has0 ties go to negative, like argmax over [neg, pos]
  got = metrics.classification_metrics(LOG(np.array([[.3, .4, .3]])), np.array([2]), 'binary')
  assert got['Has0_acc_2'] == 0.0


@settings(max_examples=60, deadline=None)
@given(data=st.data(), num_classes=st.integers(2, 7))
def test_weighted_f1_matches_independent_computation(data, num_classes):
  n = data.draw(st.integers(1, 40))
  y = data.draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, num_classes - 1)))
  p = data.draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, num_classes - 1)))
  w = data.draw(hnp.arrays(np.int64, (n,), elements=st.integers(1, 3)))
  assert metrics.weighted_f1(p, y, num_classes) == pytest.approx(reference_weighted_f1(y, p))
  # integer weights act like repeated samples
  assert metrics.weighted_f1(p, y, num_classes, w) == pytest.approx(
      reference_weighted_f1(np.repeat(y, w), np.repeat(p, w)))
  assert metrics.accuracy(p, y, w) == pytest.approx(np.mean(np.repeat(p, w) == np.repeat(y, w)))


def test_metric_errors():
  with pytest.raises(ValueError, match='task'):
    metrics.classification_metrics(np.zeros((2, 3)), np.zeros(2), 'five')
  with pytest.raises(ValueError, match=r'\(N, 7\)'):
    metrics.classification_metrics(np.zeros((2, 3)), np.zeros(2), 'seven')
  with pytest.raises(ValueError, match='labels'):
    metrics.classification_metrics(np.zeros((2, 3)), np.zeros(3), 'binary')
  with pytest.raises(ValueError, match='NaN'):
    metrics.classification_metrics(np.full((1, 3), np.nan), np.zeros(1), 'binary')
  with pytest.raises(ValueError, match='valid'):
    metrics.classification_metrics(np.zeros((2, 3)), np.zeros(2), 'binary', np.ones(3))
  assert metrics.main_metric('binary') == 'Non0_acc_2'
  assert metrics.main_metric('seven') == 'Acc_7'


# ------------------------------------------------------------------------------ AUILC

def test_auilc_of_a_linear_curve():
  rates = np.round(np.linspace(0, 1, 11), 10)
  values = 0.8 - 0.4 * rates  # area of a line over [0, 1] = value at the midpoint = 0.6
  assert metrics.auilc(rates, values) == pytest.approx(0.6)
  perm = np.random.default_rng(0).permutation(11)
  assert metrics.auilc(rates[perm], values[perm]) == pytest.approx(0.6)
  assert metrics.auilc([0, 0.5, 1], [1, 0, 1]) == pytest.approx(0.5)  # two triangles
  with pytest.raises(ValueError, match='span'):
    metrics.auilc([0.0, 0.5], [1, 1])
  with pytest.raises(ValueError, match='distinct'):
    metrics.auilc([0.0, 0.5, 0.5, 1.0], [1, 1, 1, 1])


# ------------------------------------------------------------------------------- tau

def test_tau_grid():
  taus = metrics.tau_grid(0.0, 3.0, 0.1)
  assert taus.shape == (31,) and taus[0] == 0.0 and taus[-1] == 3.0
  assert taus[3] == 0.3 and taus[7] == 0.7  # no float drift
  np.testing.assert_array_equal(metrics.tau_grid(0.5, 1.0, 0.25), [0.5, 0.75, 1.0])
  with pytest.raises(ValueError):
    metrics.tau_grid(0.0, 1.0, 0.0)


def test_debias_shape_and_values():
  logp = LOG(np.array([[.2, .3, .5], [.6, .2, .2]]))
  logp_cf = LOG(np.array([[.1, .1, .8], [.3, .3, .4]]))
  out = metrics.debias(logp, logp_cf, [0.0, 1.0, 2.5])
  assert out.shape == (3, 2, 3)
  np.testing.assert_allclose(out[0], logp)
  np.testing.assert_allclose(out[2], logp - 2.5 * logp_cf)


# Constructed validation set for tau selection. Debiased score of class c: log p_c - tau·log q_c.
#   A (neg): p (.3 .1 .6), q (.1 .1 .8): neg beats pos iff 2.080·tau > log 2 = 0.693, tau >= 0.4
#   B (pos): p (.15 .1 .75), same q: stays pos iff 2.080·tau < log 5 = 1.609, i.e. tau <= 0.7
#   C (neutral): ignored by Non0_acc_2.      (neutral never wins for A or B: log .1 is smallest)
# Non0_acc_2 = 1/2 for tau <= 0.3, 1 for 0.4..0.7, 1/2 from 0.8 -> best 0.4 (smallest of ties).
#   D (pos, padded, valid 0): A's scores with label pos; if it counted, the accuracies would be
#   2/3, 2/3 and 1/3 and the pick 0.0.
SELECT_P = np.array([[.3, .1, .6], [.15, .1, .75], [.3, .4, .3], [.3, .1, .6]])
SELECT_Q = np.array([[.1, .1, .8], [.1, .1, .8], [.3, .4, .3], [.1, .1, .8]])
SELECT_Y = np.array([0, 2, 1, 2])


def test_select_tau_picks_the_best_smallest_tau_and_ignores_padding():
  taus = metrics.tau_grid()
  best, per_tau = metrics.select_tau(LOG(SELECT_P), LOG(SELECT_Q), SELECT_Y, 'binary', taus,
                                     valid=np.array([1, 1, 1, 0]))
  assert best == 0.4
  expected = np.where(taus <= 0.3, 0.5, np.where(taus <= 0.7, 1.0, 0.5))
  np.testing.assert_allclose(per_tau, expected)
  best_all, per_tau_all = metrics.select_tau(LOG(SELECT_P), LOG(SELECT_Q), SELECT_Y, 'binary',
                                             taus)
  assert best_all == 0.0
  np.testing.assert_allclose(per_tau_all[[0, 3, 4, 7, 8]], [2 / 3, 2 / 3, 2 / 3, 2 / 3, 1 / 3])


def test_metrics_per_tau_and_oracle():
  taus = metrics.tau_grid()
  per_tau = metrics.metrics_per_tau(LOG(SELECT_P[:3]), LOG(SELECT_Q[:3]), SELECT_Y[:3],
                                    'binary', taus)
  assert set(per_tau) == set(metrics.METRIC_NAMES['binary'])
  assert all(v.shape == (31,) for v in per_tau.values())
  at_zero = metrics.classification_metrics(LOG(SELECT_P[:3]), SELECT_Y[:3], 'binary')
  for name, value in at_zero.items():
    assert per_tau[name][0] == pytest.approx(value)
  oracle = metrics.oracle_metrics(per_tau, taus)
  assert oracle['Non0_acc_2'] == (1.0, 0.4)
  with pytest.raises(ValueError, match='metric'):
    metrics.select_tau(LOG(SELECT_P), LOG(SELECT_Q), SELECT_Y, 'binary', taus, metric='Acc_7')


# ------------------------------------------------------------------------ streaming

def test_streaming_sums_inside_jit():
  logp = jnp.log(jnp.array([[.7, .3], [.2, .8], [.6, .4], [.9, .1]]))
  labels = jnp.array([0, 0, 0, 1])
  valid = jnp.array([1., 1., 1., 0.])  # last row is padding
  sums = jax.jit(lambda l, y, v: {'acc': metrics.accuracy_sum_count(l, y, v),
                                  'loss': metrics.sum_count(jnp.array([1., 2., 3., 99.]), v)}
                 )(logp, labels, valid)
  total = metrics.merge_sums(sums, sums)
  out = metrics.finalize_sums(total)
  assert out['acc'] == pytest.approx(2 / 3) and out['loss'] == pytest.approx(2.0)
  assert np.isnan(metrics.finalize_sums({'x': (0.0, 0.0)})['x'])


def test_counterfactual_summary_by_hand():
  logp = np.log([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
  logp_cf = np.log([[0.5, 0.1, 0.4], [0.4, 0.2, 0.4], [0.1, 0.1, 0.8], [0.2, 0.1, 0.7]])
  # argmax: factual 0, 2, 1, 0; counterfactual 0, 0 (tie → first), 2, 2
  s = metrics.counterfactual_summary(logp, logp_cf)
  assert s['agreement'] == 0.25
  assert s['cf_class_shares'] == [0.5, 0.0, 0.5]
  with pytest.raises(ValueError, match='equal'):
    metrics.counterfactual_summary(logp, logp_cf[:2])
