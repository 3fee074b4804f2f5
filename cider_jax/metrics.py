"""Classification metrics, AUILC and counterfactual-strength (tau) selection (docs/model.md §5).

Pure numpy (no scikit-learn). The definitions follow the original's evaluation code:

  3-class task (labels 0 negative, 1 neutral, 2 positive):
    Acc_3, F1_3       argmax over the 3 classes; F1 weighted by class support.
    Has0_acc_2/_F1    argmax over [negative, positive] (ties -> negative); truth: negative vs
                      non-negative, so a neutral sample counts as positive.
    Non0_acc_2/_F1    neutral samples removed; argmax over all 3 classes, so predicting
                      neutral is an error; F1 weighted by support.
  7-class task: Acc_7, F1_7 (weighted). The original reports no 2-class metrics for the
  7-class task, and neither does this module.
  (The original names the F1 values F1_score_3, Has0_F1_score, Non0_F1_score, F1_score_7.)

"Weighted F1" is scikit-learn's average='weighted': per class F1 = 2·TP / (2·TP + FP + FN)
(0 when undefined), averaged with weights equal to each class's number of true samples.
Every function takes optional `valid` weights (N,): examples with weight 0 (padding) never
count; other weights act as sample weights. A metric over no example is NaN.

Model selection uses `main_metric(task)`. The debiased prediction is
argmax(logp - tau·logp_cf); tau is chosen on the validation split by `select_tau`.
"""
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cider_jax.spec import NUM_CLASSES

_MAIN_METRIC = {'binary': 'Non0_acc_2', 'seven': 'Acc_7'}
METRIC_NAMES = {
    'binary': ('Acc_3', 'F1_3', 'Has0_acc_2', 'Has0_F1', 'Non0_acc_2', 'Non0_F1'),
    'seven': ('Acc_7', 'F1_7'),
}
NEUTRAL = 1  # neutral class of the 3-class task


def _check_task(task):
  if task not in NUM_CLASSES:
    raise ValueError(f"task must be one of {sorted(NUM_CLASSES)}, got {task!r}")


def main_metric(task: str) -> str:
  """Name of the model-selection metric: 'Non0_acc_2' (3-class) or 'Acc_7' (7-class)."""
  _check_task(task)
  return _MAIN_METRIC[task]


# ----------------------------------------------------------------------- basic metrics

def _weights(valid, n):
  if valid is None:
    return np.ones((n,), np.float64)
  w = np.asarray(valid, np.float64)
  if w.shape != (n,):
    raise ValueError(f'valid: expected shape ({n},), got {w.shape}')
  if np.any(w < 0) or not np.all(np.isfinite(w)):
    raise ValueError('valid: weights must be finite and >= 0')
  return w


def confusion_matrix(pred, labels, num_classes, weights=None) -> np.ndarray:
  """(C, C) weighted confusion matrix, rows = true class, columns = predicted class."""
  pred, labels = np.asarray(pred, np.int64), np.asarray(labels, np.int64)
  w = _weights(weights, labels.shape[0])
  for name, x in (('pred', pred), ('labels', labels)):
    if x.shape != labels.shape or (x.size and (x.min() < 0 or x.max() >= num_classes)):
      raise ValueError(f'{name}: expected shape {labels.shape} with classes in '
                       f'[0, {num_classes}), got shape {x.shape}'
                       + (f', range [{x.min()}, {x.max()}]' if x.size else ''))
  flat = np.bincount(labels * num_classes + pred, weights=w, minlength=num_classes**2)
  return flat.reshape(num_classes, num_classes)


def accuracy(pred, labels, weights=None) -> float:
  """Weighted fraction of pred == labels; NaN for no example. pred, labels: (N,) int."""
  pred, labels = np.asarray(pred), np.asarray(labels)
  w = _weights(weights, labels.shape[0])
  total = w.sum()
  return float(np.sum(w * (pred == labels)) / total) if total > 0 else float('nan')


def weighted_f1(pred, labels, num_classes, weights=None) -> float:
  """scikit-learn's f1_score(average='weighted') with sample weights. (N,) ints in."""
  conf = confusion_matrix(pred, labels, num_classes, weights)
  support = conf.sum(axis=1)
  if support.sum() <= 0:
    return float('nan')
  tp = np.diag(conf)
  denom = support + conf.sum(axis=0)  # 2·TP + FN + FP
  f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
  return float(np.sum(f1 * support) / support.sum())


# -------------------------------------------------------------------- task metrics

def _check_logp(logp, labels, num_classes, name='logp'):
  logp = np.asarray(logp, np.float64)
  labels = np.asarray(labels)
  if logp.ndim != 2 or logp.shape[1] != num_classes:
    raise ValueError(f'{name}: expected shape (N, {num_classes}), got {logp.shape}')
  if labels.shape != (logp.shape[0],):
    raise ValueError(f'labels: expected shape ({logp.shape[0]},), got {labels.shape}')
  return logp, labels.astype(np.int64)


def classification_metrics(logp, labels, task: str, valid=None) -> Dict[str, float]:
  """Accuracy / F1 family of a task (see the module docstring).

  Args:
    logp: (N, C) log-probabilities (any scores: only their argmax is used).
    labels: (N,) int classes (0..2 for 'binary', 0..6 for 'seven').
    task: 'binary' (3-class) or 'seven'.
    valid: optional (N,) weights, 0 for padded examples.

  Returns:
    {name: value} for METRIC_NAMES[task].
  """
  _check_task(task)
  logp, labels = _check_logp(logp, labels, NUM_CLASSES[task])
  w = _weights(valid, labels.shape[0])
  if np.isnan(logp[w > 0]).any():
    raise ValueError('logp: NaN in the scores of a counted example')
  return _metrics_from_pred(np.argmax(logp, axis=1), logp, labels, task, w)


def _metrics_from_pred(pred, logp, labels, task, w):
  if task == 'seven':
    return {'Acc_7': accuracy(pred, labels, w), 'F1_7': weighted_f1(pred, labels, 7, w)}
  # Has0: negative vs the rest; prediction from [neg, pos] only (np.argmax: ties -> first).
  pred2 = (logp[:, 2] > logp[:, 0]).astype(np.int64)
  true2 = (labels >= NEUTRAL).astype(np.int64)
  # Non0: neutral samples removed (weight 0); predictions over all three classes.
  w_non0 = w * (labels != NEUTRAL)
  return {
      'Acc_3': accuracy(pred, labels, w),
      'F1_3': weighted_f1(pred, labels, 3, w),
      'Has0_acc_2': accuracy(pred2, true2, w),
      'Has0_F1': weighted_f1(pred2, true2, 2, w),
      'Non0_acc_2': accuracy(pred, labels, w_non0),
      'Non0_F1': weighted_f1(pred, labels, 3, w_non0),
  }


# ------------------------------------------------------------------------------ AUILC

def auilc(rates, values) -> float:
  """Area under the metric-vs-missing-rate curve (trapezoid rule) over [0, 1].

  Args:
    rates: (R,) distinct missing rates covering [0, 1] (must include 0 and 1), any order.
    values: (R,) metric at each rate.
  """
  rates, values = np.asarray(rates, np.float64), np.asarray(values, np.float64)
  if rates.ndim != 1 or rates.shape != values.shape or rates.size < 2:
    raise ValueError(f'auilc: expected two (R,) arrays with R >= 2, got {rates.shape} and '
                     f'{values.shape}')
  order = np.argsort(rates, kind='stable')
  rates, values = rates[order], values[order]
  if np.any(np.diff(rates) <= 0):
    raise ValueError(f'auilc: rates must be distinct, got {rates.tolist()}')
  if not (np.isclose(rates[0], 0.0) and np.isclose(rates[-1], 1.0)):
    raise ValueError(f'auilc: rates must span [0, 1] (include 0 and 1), got '
                     f'[{rates[0]}, {rates[-1]}]')
  return float(np.sum((values[1:] + values[:-1]) * np.diff(rates) / 2))


# ------------------------------------------------------------------ counterfactual tau

def tau_grid(start=0.0, stop=3.0, step=0.1) -> np.ndarray:
  """Inclusive grid start, start+step, …, stop, rounded to 10 decimals (no float drift).

  tau_grid(0.0, 3.0, 0.1) has 31 values 0.0 … 3.0.
  """
  if step <= 0 or stop < start:
    raise ValueError(f'tau_grid: need step > 0 and stop >= start, got ({start}, {stop}, {step})')
  n = int(np.floor((stop - start) / step + 1e-9)) + 1
  return np.round(start + step * np.arange(n), 10)


def debias(logp, logp_cf, taus) -> np.ndarray:
  """Debiased scores logp - tau·logp_cf for every tau, in float64.

  Args:
    logp, logp_cf: (N, C) factual and counterfactual log-probabilities.
    taus: (K,) counterfactual strengths.

  Returns:
    (K, N, C) scores (argmax over C gives the debiased prediction).
  """
  logp, logp_cf = np.asarray(logp, np.float64), np.asarray(logp_cf, np.float64)
  taus = np.asarray(taus, np.float64).reshape(-1)
  if logp.ndim != 2 or logp.shape != logp_cf.shape:
    raise ValueError(f'debias: logp and logp_cf must be equal (N, C) shapes, got {logp.shape} '
                     f'and {logp_cf.shape}')
  return logp[None] - taus[:, None, None] * logp_cf[None]


def metrics_per_tau(logp, logp_cf, labels, task, taus, valid=None) -> Dict[str, np.ndarray]:
  """Every metric of the task at every tau: {name: (K,) array}."""
  _check_task(task)
  logp, labels = _check_logp(logp, labels, NUM_CLASSES[task])
  _check_logp(logp_cf, labels, NUM_CLASSES[task], 'logp_cf')
  w = _weights(valid, labels.shape[0])
  scores = debias(logp, logp_cf, taus)
  if np.isnan(scores[:, w > 0]).any():
    raise ValueError('logp/logp_cf: NaN in the scores of a counted example')
  per_tau = [_metrics_from_pred(np.argmax(s, axis=1), s, labels, task, w) for s in scores]
  return {name: np.asarray([m[name] for m in per_tau]) for name in METRIC_NAMES[task]}


def debiased_metrics(logp, logp_cf, labels, task, tau: float) -> Dict[str, float]:
  """`classification_metrics` of the debiased prediction y − τ·y_cf."""
  return classification_metrics(debias(logp, logp_cf, [tau])[0], labels, task)


def select_tau(logp_valid, logp_cf_valid, labels_valid, task, taus, valid=None,
               metric: Optional[str] = None) -> Tuple[float, np.ndarray]:
  """Tau maximising the selection metric on the validation split.

  Ties go to the smallest tau (the least debiasing that reaches the best value).

  Args:
    logp_valid, logp_cf_valid: (N, C) factual / counterfactual log-probabilities.
    labels_valid: (N,) labels.
    task: 'binary' or 'seven'.
    taus: (K,) candidate strengths, e.g. tau_grid().
    valid: optional (N,) weights, 0 for padded examples.
    metric: the metric maximised (default main_metric(task)).

  Returns:
    (best_tau, metric_per_tau (K,)).
  """
  metric = metric or main_metric(task)
  if metric not in METRIC_NAMES.get(task, ()):
    raise ValueError(f'metric {metric!r} is not a {task!r} metric; choose from '
                     f'{METRIC_NAMES.get(task)}')
  taus = np.asarray(taus, np.float64).reshape(-1)
  if taus.size == 0:
    raise ValueError('select_tau: empty tau grid')
  values = metrics_per_tau(logp_valid, logp_cf_valid, labels_valid, task, taus, valid)[metric]
  if np.all(np.isnan(values)):
    raise ValueError(f'select_tau: {metric} is undefined (no counted validation example)')
  best = np.nanmax(values)
  return float(np.min(taus[values == best])), values


def counterfactual_summary(logp, logp_cf) -> Dict[str, object]:
  """How much of the prediction the counterfactual input already gives (docs/maci.md §5).

  agreement: the share of examples whose factual and counterfactual argmax coincide (near 1:
  the model predicts from what the counterfactual keeps, so y - τ·y_cf has little to
  separate); cf_class_shares: the share of each class among the counterfactual argmaxes (one
  class near 1: y_cf is a constant offset, not a per-example bias).
  """
  logp, logp_cf = np.asarray(logp), np.asarray(logp_cf)
  if logp.shape != logp_cf.shape or logp.ndim != 2 or not len(logp):
    raise ValueError(f'counterfactual_summary: need two equal (N, C) arrays, N > 0; got '
                     f'{logp.shape} and {logp_cf.shape}')
  top, top_cf = np.argmax(logp, -1), np.argmax(logp_cf, -1)
  shares = np.bincount(top_cf, minlength=logp.shape[-1]) / len(top_cf)
  return {'agreement': float(np.mean(top == top_cf)),
          'cf_class_shares': [float(s) for s in shares]}


def oracle_metrics(per_tau: Dict[str, np.ndarray], taus) -> Dict[str, Tuple[float, float]]:
  """The original's optimistic protocol: each metric's own best over the tau grid.

  Args:
    per_tau: output of `metrics_per_tau` (on the split that is reported).
    taus: (K,) the grid it was computed on.

  Returns:
    {name: (best value, its smallest tau)}. Test-set tuned: label it as such in reports.
  """
  taus = np.asarray(taus, np.float64)
  out = {}
  for name, values in per_tau.items():
    best = np.nanmax(values)
    out[name] = (float(best), float(np.min(taus[values == best])))
  return out


# ------------------------------------------------------------ streaming (sum, count)

def sum_count(values, weights=None):
  """(sum of values·weights, sum of weights) of (N,) values; jnp, usable inside jit."""
  values = jnp.asarray(values, jnp.float32)
  weights = jnp.ones_like(values) if weights is None else jnp.asarray(weights, jnp.float32)
  return jnp.sum(values * weights), jnp.sum(weights)


def accuracy_sum_count(logp, labels, valid=None):
  """(number of correct argmax predictions, number of examples), padded examples excluded.

  logp: (B, C); labels: (B,); valid: optional (B,) weights. jnp, usable inside jit.
  """
  correct = (jnp.argmax(logp, axis=-1) == jnp.asarray(labels)).astype(jnp.float32)
  return sum_count(correct, valid)


def merge_sums(a, b):
  """Add two pytrees of (sum, count) pairs (e.g. dicts name -> (sum, count))."""
  return jax.tree_util.tree_map(lambda x, y: x + y, a, b)


def finalize_sums(sums) -> Dict[str, float]:
  """{name: sum / count} from {name: (sum, count)}; NaN where count is 0."""
  out = {}
  for name, (total, count) in sums.items():
    count = float(count)
    out[name] = float(total) / count if count > 0 else float('nan')
  return out
