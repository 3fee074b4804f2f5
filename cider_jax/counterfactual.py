"""Bias-word vocabulary and counterfactual text for MACI (docs/model.md §5).

The bias vocabulary is built once from the train split. The counterfactual text keeps the
special tokens and the bias words of a (possibly already masked) text and replaces every
other token by [MASK], so the counterfactual pass sees only what the model could exploit as
a label shortcut.

Two implementations of the counterfactual text: `counterfactual_ids` (numpy, for data
preparation) and `counterfactual_ids_jax` (a gather on a lookup table, for use inside jit).
"""
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from cider_jax import tokens
from cider_jax.spec import NUM_CLASSES

# Classes whose counts enter the coefficient of variation: for the 3-class task only
# negative (0) and positive (2); for the 7-class task all seven.
_CV_CLASSES = {'binary': (0, 2), 'seven': tuple(range(7))}


class BiasVocabulary(NamedTuple):
  """A bias vocabulary with the statistics it was chosen by.

  ids:    (K,) int32 token ids, most frequent first (ties: first occurrence in the split).
  counts: (K,) int64 total occurrences over all classes (neutral included).
  cv:     (K,) float32 coefficient of variation of the per-class counts used.
  """
  ids: np.ndarray
  counts: np.ndarray
  cv: np.ndarray


def _as_int_ids(token_ids, name='token_ids'):
  """Integer copy of token ids given as int or integral float (MMSA stores them as float)."""
  arr = np.asarray(token_ids)
  if np.issubdtype(arr.dtype, np.floating):
    if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
      raise ValueError(f'{name}: token ids must be integral, got non-integer float values')
    return arr.astype(np.int64)
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f'{name}: expected integer token ids, got dtype {arr.dtype}')
  return arr.astype(np.int64)


def bias_vocabulary_stats(token_ids, labels, task, top_k=100, cv_threshold=0.1,
                          reproduce_stale_cv=False,
                          special: tokens.SpecialTokens = tokens.BERT) -> BiasVocabulary:
  """Bias words of a train split with their counts and coefficients of variation.

  Every token occurrence is counted per class; the special tokens ([PAD], [UNK], [CLS],
  [SEP], [MASK]) are skipped. All positions of a row are counted, padding included (padding
  is [PAD], skipped), as the original does. The coefficient of variation is the population
  std over the mean of the counts of the classes used (3-class: negative and positive only;
  7-class: all seven), computed in float32 like the original; cv >= cv_threshold (compared in
  float32) makes a candidate. The `top_k` candidates with the largest total count over all classes (neutral
  included) are kept, ties in order of first occurrence in the split (sample order, then
  position).

  A 3-class word seen only in neutral samples has mean 0 over the classes used. It is not a
  bias word (docs/model.md §5). The original code instead reuses the coefficient of variation of
  the previous word of its dictionary (a stale variable; it crashes if that word is the first
  one); `reproduce_stale_cv=True` reproduces that, for parity with vocabularies the original
  built on real data.

  Args:
    token_ids: (N, L) token ids of the train split (int, or integral float as in MMSA).
    labels: (N,) class labels: 0..2 for task 'binary' (neg, neutral, pos), 0..6 for 'seven'.
    task: 'binary' (the 3-class task) or 'seven'.
    top_k: number of bias words kept (the original's `bias_thresh`).
    cv_threshold: minimum coefficient of variation of a bias word.
    reproduce_stale_cv: see above.
    special: the special-token ids of the text's vocabulary (bert-base-uncased's by default).

  Returns:
    BiasVocabulary(ids (K,), counts (K,), cv (K,)) with K <= top_k.
  """
  if task not in NUM_CLASSES:
    raise ValueError(f"task must be one of {sorted(NUM_CLASSES)}, got {task!r}")
  num_classes = NUM_CLASSES[task]
  ids = _as_int_ids(token_ids)
  if ids.ndim != 2:
    raise ValueError(f'token_ids: expected shape (N, L), got {ids.shape}')
  labels = np.asarray(labels)
  if labels.shape != (ids.shape[0],):
    raise ValueError(f'labels: expected shape ({ids.shape[0]},), got {labels.shape}')
  labels = _as_int_ids(labels, 'labels')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'labels: task {task!r} needs labels in [0, {num_classes}), got '
                     f'[{labels.min()}, {labels.max()}]')
  if top_k < 0:
    raise ValueError(f'top_k must be >= 0, got {top_k}')

  # Occurrences in split order: sample by sample, position by position.
  flat_ids = ids.reshape(-1)
  flat_labels = np.repeat(labels, ids.shape[1])
  regular = ~np.isin(flat_ids, special.ids)
  flat_ids, flat_labels = flat_ids[regular], flat_labels[regular]
  if flat_ids.size == 0:
    empty = np.zeros((0,), np.int64)
    return BiasVocabulary(empty.astype(np.int32), empty, np.zeros((0,), np.float32))

  words, first_pos, inverse = np.unique(flat_ids, return_index=True, return_inverse=True)
  counts = np.bincount(inverse * num_classes + flat_labels,
                       minlength=words.size * num_classes).reshape(words.size, num_classes)
  total = counts.sum(axis=1)

  used = counts[:, list(_CV_CLASSES[task])].astype(np.float32)
  mean = used.mean(axis=1, dtype=np.float32)
  std = used.std(axis=1, dtype=np.float32)
  seen = mean > 0
  with np.errstate(divide='ignore', invalid='ignore'):
    cv = np.where(seen, std / np.where(seen, mean, 1), np.float32(np.nan)).astype(np.float32)

  if reproduce_stale_cv and not seen.all():
    cv = _stale_cv(cv, seen, first_pos)
    seen = np.isfinite(cv)

  candidate = seen & (cv >= np.float32(cv_threshold))
  cand = np.flatnonzero(candidate)
  # Most frequent first; ties by first occurrence (lexsort: last key is the primary one).
  order = cand[np.lexsort((first_pos[cand], -total[cand]))][:top_k]
  return BiasVocabulary(words[order].astype(np.int32), total[order].astype(np.int64),
                        cv[order])


def _stale_cv(cv, seen, first_pos):
  """cv where words with mean 0 take the cv of the previous word in first-occurrence order.

  (W,) arrays in; raises like the original when the first word has no cv to inherit.
  """
  order = np.argsort(first_pos, kind='stable')
  seen_o = seen[order]
  if not seen_o[0]:
    raise ValueError('reproduce_stale_cv: the first word of the split is seen only in neutral '
                     'samples; the original code fails here (no previous coefficient of '
                     'variation to reuse)')
  last_seen = np.maximum.accumulate(np.where(seen_o, np.arange(order.size), 0))
  out = np.empty_like(cv)
  out[order] = cv[order][last_seen]
  return out


def bias_vocabulary(token_ids, labels, task, top_k=100, cv_threshold=0.1,
                    reproduce_stale_cv=False,
                    special: tokens.SpecialTokens = tokens.BERT) -> np.ndarray:
  """(K,) int32 bias-word ids of a train split, most frequent first; K <= top_k.

  See `bias_vocabulary_stats` for the rule (docs/model.md §5) and the arguments.
  """
  return bias_vocabulary_stats(token_ids, labels, task, top_k, cv_threshold,
                               reproduce_stale_cv, special).ids


def counterfactual_ids(token_ids, bias_vocab,
                       special: tokens.SpecialTokens = tokens.BERT) -> np.ndarray:
  """Counterfactual text: special tokens and bias words kept, every other token -> [MASK].

  Args:
    token_ids: (..., L) token ids, int or integral float (the dtype is preserved).
    bias_vocab: (K,) bias-word ids.
    special: the special-token ids of the text's vocabulary (bert-base-uncased's by default).

  Returns:
    (..., L) ids, same dtype as `token_ids`.
  """
  arr = np.asarray(token_ids)
  ids = _as_int_ids(arr)
  vocab = _as_int_ids(bias_vocab, 'bias_vocab').reshape(-1)
  keep = np.isin(ids, special.ids) | np.isin(ids, vocab)
  return np.where(keep, arr, np.asarray(special.mask, arr.dtype)).astype(arr.dtype)


def bias_lookup_table(bias_vocab, vocab_size,
                      special: tokens.SpecialTokens = tokens.BERT) -> jnp.ndarray:
  """(V,) bool table, True for ids kept in the counterfactual text (bias words and specials).

  Args:
    bias_vocab: (K,) bias-word ids, each in [0, vocab_size).
    vocab_size: V, the text encoder's vocabulary size.
    special: the special-token ids of the text's vocabulary (bert-base-uncased's by default).
  """
  vocab = _as_int_ids(bias_vocab, 'bias_vocab').reshape(-1)
  if vocab_size <= 0:
    raise ValueError(f'vocab_size must be positive, got {vocab_size}')
  if vocab.size and (vocab.min() < 0 or vocab.max() >= vocab_size):
    raise ValueError(f'bias_vocab: ids must lie in [0, {vocab_size}), got '
                     f'[{vocab.min()}, {vocab.max()}]')
  table = np.zeros((vocab_size,), bool)
  table[vocab] = True
  specials = np.asarray([s for s in special.ids if s < vocab_size], np.int64)
  table[specials] = True
  return jnp.asarray(table)


def counterfactual_ids_jax(token_ids, table,
                           special: tokens.SpecialTokens = tokens.BERT) -> jnp.ndarray:
  """jit-friendly `counterfactual_ids`: a gather on a `bias_lookup_table`.

  Special ids are kept whatever the table says. Ids outside [0, V) are treated as non-bias
  words (-> [MASK]); they never index out of range.

  Args:
    token_ids: (..., L) token ids, int or integral float (the dtype is preserved).
    table: (V,) bool (or 0/1) table from `bias_lookup_table`.
    special: the special-token ids of the text's vocabulary (bert-base-uncased's by default).

  Returns:
    (..., L) ids, same dtype as `token_ids`.
  """
  token_ids = jnp.asarray(token_ids)
  ids = token_ids.astype(jnp.int32)
  vocab_size = table.shape[0]
  in_table = (ids >= 0) & (ids < vocab_size)
  keep = in_table & (jnp.take(table, jnp.clip(ids, 0, vocab_size - 1), axis=0) > 0)
  for special_id in special.ids:
    keep = keep | (ids == special_id)
  return jnp.where(keep, token_ids, jnp.asarray(special.mask, token_ids.dtype))
