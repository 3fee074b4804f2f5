"""OOD repartition of an MMSA pickle: word-label biases of train reversed in test (docs/ood.md).

Every example of the input is pooled. The bias words of the pool are those of the
counterfactual text (`counterfactual.bias_vocabulary_stats`: per-token class counts, coefficient
of variation >= cv_threshold, the top_k most frequent) seen in at least min_count examples.
Each example gets a bias score: the sum over the distinct bias words it contains of the
word's pointwise mutual information with the example's own label,

  score_i = sum_{w in x_i} log( p(y_i | w) / p(y_i) ),

with p(y | w) from the pool's document counts, leaving example i out and smoothed towards the
prior, p(y | w) = (n_wy - [y = y_i] + a p(y)) / (n_w - 1 + a). A positive score means the
example's words point to its own label (bias-consistent), a negative one away from it.

Within each class (so every split keeps the pool's label distribution), examples are ranked
by key_i = strength * z_i + e_i, z the score standardised within the class and e ~ N(0, 1):
the top of the ranking goes to train, the bottom to test, with the input's split sizes.
strength 0 gives a stratified random (IID) split; a large strength sorts by score. The
validation split is drawn like train (`like_train`, the default) or like test (`like_test`).

  python -m cider_jax.data.ood_split IN.pkl OUT.pkl --task binary [--seed 0] [--strength 1]

writes OUT (a plain pickle in the input's format, every field carried over) and OUT's name
with `.json` (the report: sizes, label distributions, bias words per split, text probe).
"""
import argparse
import json
import os
import pickle
import sys
import tempfile
from typing import Mapping

import numpy as np

from cider_jax import tokens
from cider_jax.data import mmsa, ood_report
from cider_jax.data.validate import DataError

SPLITS = mmsa.SPLITS
VALID_MODES = ('like_train', 'like_test')
DEFAULT_STRENGTH = 1.0
_NUM_CLASSES = {'binary': 3, 'seven': 7}
_SMOOTHING = 1.0  # a: prior pseudo-count of p(y | w)


# ---------------------------------------------------------------------------- pooling


def pool_fields(data: Mapping, splits: Mapping[str, mmsa.Split], source: str = '<data>'):
  """Concatenates train, valid and test field by field.

  Returns (fields, sizes, dropped): fields {name: (N_total, ...) array} for every field that
  all three splits hold with one row per example (`id` and `raw_text` taken from the validated
  splits when a file lacks them); sizes {split: N}; dropped, the names of the other fields
  (not per example, or not in every split). A per-example field whose rows differ in shape
  between splits cannot be pooled and is an error.
  """
  sizes = {s: len(splits[s]) for s in SPLITS}
  fields, dropped = {}, []
  for name in sorted(set().union(*(map(str, data[s]) for s in SPLITS))):
    if not all(name in data[s] for s in SPLITS):
      dropped.append(name)
      continue
    parts = []
    for s in SPLITS:
      value = data[s][name]
      arr = value if isinstance(value, np.ndarray) else np.asarray(value, dtype=object)
      parts.append(arr)
    if any(p.ndim == 0 or p.shape[0] != sizes[s] for p, s in zip(parts, SPLITS)):
      dropped.append(name)
      continue
    if len({p.shape[1:] for p in parts}) > 1:
      raise DataError(f"{source}: field '{name}' has per-example shapes "
                      f'{[p.shape[1:] for p in parts]} in {list(SPLITS)}; expected one shape '
                      'to pool the splits', field=name)
    fields[name] = np.concatenate(parts, axis=0)
  for name, attr in (('id', 'ids'), ('raw_text', 'raw_text')):
    if name not in fields:
      fields[name] = np.concatenate([getattr(splits[s], attr) for s in SPLITS])
  return fields, sizes, dropped


# ---------------------------------------------------------------------------- bias score


def presence(ids: np.ndarray, mask: np.ndarray, words: np.ndarray) -> np.ndarray:
  """(N, W) bool: word words[k] occurs among the attended tokens of example i."""
  ids = np.where(mask > 0, ids, -1).astype(np.int64)
  out = np.zeros((ids.shape[0], words.size), bool)
  if words.size == 0:
    return out
  table = np.full(max(int(ids.max()), int(words.max())) + 2, -1, np.int64)
  table[words] = np.arange(words.size)
  col = table[ids]  # -1 (the table's last entry) for padding
  rows = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)
  hit = col >= 0
  out[rows[hit], col[hit]] = True
  return out


def bias_words(ids, mask, labels, task, *, top_k=100, min_count=5, cv_threshold=0.1,
               special: tokens.SpecialTokens = tokens.BERT):
  """The pool's bias words and their document counts per class.

  ids, mask: (N, L) token ids and attention mask; labels: (N,) int of `task`.
  Returns (words (W,) int64, counts (W, C) int64: examples of class c containing the word,
  cv (W,) float32): the bias vocabulary of the counterfactual text (occurrence counts,
  coefficient of variation, top_k most frequent) restricted to words in >= min_count examples.
  """
  from cider_jax import counterfactual  # pylint: disable=g-import-not-at-top
  vocab = counterfactual.bias_vocabulary_stats(np.where(mask > 0, ids, special.pad), labels,
                                               task, top_k=top_k, cv_threshold=cv_threshold,
                                               special=special)
  words = vocab.ids.astype(np.int64)
  counts = presence(ids, mask, words).T.astype(np.int64) @ np.eye(_NUM_CLASSES[task],
                                                                   dtype=np.int64)[labels]
  keep = counts.sum(1) >= min_count
  return words[keep], counts[keep], vocab.cv[keep]


def bias_scores(present: np.ndarray, labels: np.ndarray, counts: np.ndarray,
                prior: np.ndarray, smoothing: float = _SMOOTHING) -> np.ndarray:
  """(N,) score_i = sum over words in x_i of log p(y_i | w) / p(y_i), leaving i out.

  present: (N, W) bool; labels: (N,) int; counts: (W, C) document counts of the pool (with
  example i in them); prior: (C,) p(y) of the pool.
  """
  own = counts[:, labels].T - present                        # (N, W) n_{w, y_i} without i
  total = counts.sum(1)[None, :] - present                    # (N, W) n_w without i
  p_own = prior[labels][:, None]                              # (N, 1)
  pmi = np.log((own + smoothing * p_own) / (total + smoothing)) - np.log(p_own)
  return np.where(present, pmi, 0.0).sum(1)


# ---------------------------------------------------------------------------- assignment


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
  """(C,) non-negative ints summing to `total`, proportional to weights, each <= weight
  when the weights are counts summing to >= total."""
  weights = np.asarray(weights, np.float64)
  if total == 0 or weights.sum() == 0:
    return np.zeros(weights.shape, np.int64)
  exact = total * weights / weights.sum()
  out = np.floor(exact).astype(np.int64)
  order = np.argsort(-(exact - out), kind='stable')
  out[order[:total - out.sum()]] += 1
  return out


def class_quotas(labels: np.ndarray, sizes: Mapping[str, int], num_classes: int) -> np.ndarray:
  """(C, 3) examples of each class per split (train, valid, test): every split's label
  distribution as close to the pool's as whole numbers allow; rows sum to the class counts,
  columns to the split sizes."""
  counts = np.bincount(labels, minlength=num_classes)
  train = _largest_remainder(sizes['train'], counts)
  valid = _largest_remainder(sizes['valid'], counts - train)
  return np.stack([train, valid, counts - train - valid], axis=1)


def _take_in_order(order, quota, rng, valid_mode):
  """Split codes (0 train, 1 valid, 2 test) for `order` (most bias-consistent first)."""
  n_train, n_valid, _ = quota
  codes = np.full(order.size, 2, np.int64)
  if valid_mode == 'like_train':   # train and valid drawn at random from the top
    head = np.full(n_train + n_valid, 0, np.int64)
    head[rng.permutation(head.size)[:n_valid]] = 1
    codes[:head.size] = head
  else:                            # valid and test drawn at random from the bottom
    codes[:n_train] = 0
    tail = codes[n_train:]
    tail[rng.permutation(tail.size)[:n_valid]] = 1
  out = np.empty_like(codes)
  out[order] = codes
  return out


def _standardise(x):
  if x.size == 0:
    return x
  sd = x.std()
  return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


def assign(scores: np.ndarray, labels: np.ndarray, sizes: Mapping[str, int], num_classes: int,
           *, strength: float, rng: np.random.Generator, valid_mode: str = 'like_train',
           label_shift: bool = False) -> np.ndarray:
  """(N,) split codes 0 train / 1 valid / 2 test with the given sizes.

  Ranks by strength * standardised score + N(0, 1) noise, within each class (label
  distributions kept) or, with label_shift, over the whole pool (labels whose examples are
  more bias-consistent then go to train more often).
  """
  if valid_mode not in VALID_MODES:
    raise ValueError(f'valid_mode must be one of {VALID_MODES}, got {valid_mode!r}')
  noise = rng.standard_normal(scores.shape[0])
  codes = np.empty(scores.shape[0], np.int64)
  if label_shift:
    groups = [(np.arange(scores.shape[0]), [sizes[s] for s in SPLITS])]
  else:
    quotas = class_quotas(labels, sizes, num_classes)
    groups = [(np.flatnonzero(labels == c), quotas[c]) for c in range(num_classes)]
  for members, quota in groups:
    key = strength * _standardise(scores[members]) + noise[members]
    order = np.argsort(-key, kind='stable')
    codes[members] = _take_in_order(order, quota, rng, valid_mode)
  return codes


# ---------------------------------------------------------------------------- repartition


def repartition(data: Mapping, task: str, *, seed: int = 0, strength: float = DEFAULT_STRENGTH,
                valid_mode: str = 'like_train', label_shift: bool = False, top_k: int = 100,
                min_count: int = 5, cv_threshold: float = 0.1, run_probe: bool = True,
                special: tokens.SpecialTokens = tokens.BERT, names=None, source: str = '<data>',
                log=lambda msg: None):
  """Repartitions an MMSA dict (as unpickled). Returns (new dict, report dict).

  The new dict has the input's split sizes and every field carried over; the split of each
  example follows `assign`. Deterministic given `seed`.
  """
  if task not in _NUM_CLASSES:
    raise DataError(f"--task is {task!r}; expected 'binary' or 'seven'")
  if strength < 0 or not np.isfinite(strength):
    raise DataError(f'--strength is {strength}; expected a finite value >= 0')
  if min_count < 1 or top_k < 1:
    raise DataError(f'--min_count {min_count} / --top_k {top_k}: expected >= 1')
  num_classes = _NUM_CLASSES[task]
  splits = mmsa.splits_from_dict(data, source=source, special=special)
  fields, sizes, dropped = pool_fields(data, splits, source)
  ids = np.concatenate([splits[s].text_ids for s in SPLITS])
  mask = np.concatenate([splits[s].text_mask for s in SPLITS])
  labels = np.concatenate([splits[s].labels(task) for s in SPLITS]).astype(np.int64)
  prior = np.bincount(labels, minlength=num_classes) / labels.size
  log(f'pool: {labels.size} examples ({", ".join(f"{s} {n}" for s, n in sizes.items())})')

  words, counts, cv = bias_words(ids, mask, labels, task, top_k=top_k, min_count=min_count,
                                 cv_threshold=cv_threshold, special=special)
  present = presence(ids, mask, words)
  scores = bias_scores(present, labels, counts, prior)
  log(f'bias words: {words.size}; examples with one or more: {present.any(1).mean():.1%}')

  rng = np.random.default_rng([seed, 0])
  codes = assign(scores, labels, sizes, num_classes, strength=strength, rng=rng,
                 valid_mode=valid_mode, label_shift=label_shift)
  out = {s: {name: arr[codes == c] for name, arr in fields.items()}
         for c, s in enumerate(SPLITS)}

  names = names or ood_report.token_namer(None)
  report = {
      'task': task, 'seed': seed, 'strength': strength, 'valid': valid_mode,
      'label_shift': label_shift, 'top_k': top_k, 'min_count': min_count,
      'cv_threshold': cv_threshold, 'num_bias_words': int(words.size),
      'sizes': {s: int((codes == c).sum()) for c, s in enumerate(SPLITS)},
      'labels': {'pool': ood_report.label_dist(labels, num_classes),
                 **{s: ood_report.label_dist(labels[codes == c], num_classes)
                    for c, s in enumerate(SPLITS)}},
      'mean_bias_score': {s: float(scores[codes == c].mean()) if (codes == c).any() else None
                          for c, s in enumerate(SPLITS)},
      'bias_words': ood_report.word_report(words, counts, cv, present, labels, codes, prior, names),
      'fields': sorted(fields), 'dropped_fields': dropped,
  }
  if run_probe:
    log('text probe on this split and on a random split of the same pool ...')
    iid = assign(scores, labels, sizes, num_classes, strength=0.0,
                 rng=np.random.default_rng([seed, 1]), valid_mode=valid_mode)
    acc = ood_report.probe_accuracy(ids, mask, labels, codes, num_classes, special)
    acc_iid = ood_report.probe_accuracy(ids, mask, labels, iid, num_classes, special)
    report['probe'] = {'this_split': acc, 'random_split': acc_iid,
                       'test_drop': acc_iid['test'] - acc['test']}
  return out, report


def report_path(out_path: str) -> str:
  """OUT.pkl -> OUT.json (beside the output pickle)."""
  return os.path.splitext(out_path)[0] + '.json'


def _write_atomic(path, write):
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m cider_jax.data.ood_split',
      description='Repartition an MMSA pickle into a word-bias distribution-shift benchmark: '
      'the words that go with a label in train do not in test. Same split sizes as the input, '
      'every example once, label distributions kept. Writes OUT (a pickle in the input\'s '
      'format) and OUT with .json (the report). See docs/ood.md.')
  parser.add_argument('input', metavar='IN.pkl', help='MMSA pickle or joblib file')
  parser.add_argument('output', metavar='OUT.pkl', help='repartitioned pickle to write')
  parser.add_argument('--task', required=True, choices=sorted(_NUM_CLASSES),
                      help="labels the biases are measured on: 'binary' (the 3-class task) or "
                      "'seven'")
  parser.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
  parser.add_argument('--strength', type=float, default=DEFAULT_STRENGTH,
                      help='how far train is bias-consistent and test bias-conflicting: 0 is a '
                      f'random split (default {DEFAULT_STRENGTH})')
  parser.add_argument('--valid', choices=VALID_MODES, default='like_train',
                      help='draw the validation split like train (default) or like test')
  parser.add_argument('--label_shift', action='store_true',
                      help='rank the whole pool instead of each class, so label '
                      'distributions may differ between splits')
  parser.add_argument('--top_k', type=int, default=100,
                      help='bias words kept, most frequent first (default 100, as maci.top_k)')
  parser.add_argument('--min_count', type=int, default=5,
                      help='a bias word must occur in at least this many examples (default 5)')
  parser.add_argument('--cv_threshold', type=float, default=0.1,
                      help='minimum coefficient of variation of a bias word (default 0.1)')
  parser.add_argument('--no_probe', action='store_true', help='skip the text-only probe')
  parser.add_argument('--tokenizer', metavar='DIR', default=None,
                      help='tokenizer or BERT folder the texts were tokenised with (special '
                      'ids, words in the report); default: bert-base-uncased ids, words from '
                      'the packaged all-MiniLM-L6-v2 vocabulary when installed')
  args = parser.parse_args(argv)

  def log(msg):
    print(msg, file=sys.stderr, flush=True)

  if os.path.abspath(args.input) == os.path.abspath(args.output):
    print(f'error: OUT.pkl {args.output} is the input file; choose another path',
          file=sys.stderr)
    return 1
  try:
    if args.tokenizer:
      special = tokens.from_tokenizer_dir(args.tokenizer)
      vocab = os.path.join(args.tokenizer, 'vocab.txt')
    else:
      special, vocab = tokens.BERT, ood_report.packaged_vocab()
  except (OSError, ValueError) as e:
    print(f'error: --tokenizer: {" ".join(str(e).split())}', file=sys.stderr)
    return 1
  try:
    log(f'reading {args.input}')
    data = mmsa.read_pickle(args.input)
    new, report = repartition(
        data, args.task, seed=args.seed, strength=args.strength, valid_mode=args.valid,
        label_shift=args.label_shift, top_k=args.top_k, min_count=args.min_count,
        cv_threshold=args.cv_threshold, run_probe=not args.no_probe, special=special,
        names=ood_report.token_namer(vocab), source=args.input, log=log)
  except DataError as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 1
  report['input'] = os.path.abspath(args.input)
  report['output'] = os.path.abspath(args.output)
  try:
    _write_atomic(args.output, lambda f: pickle.dump(new, f, protocol=pickle.HIGHEST_PROTOCOL))
    _write_atomic(report_path(args.output),
                  lambda f: f.write(json.dumps(report, indent=1).encode()))
  except OSError as e:
    print(f'error: cannot write {args.output}: {e.strerror or e}', file=sys.stderr)
    return 1
  print(ood_report.format_report(report))
  print(f'wrote {args.output} and {report_path(args.output)}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
