"""Linear probes (numpy only) measuring how much each modality tells about the label.

Used to check the generated data: a multinomial logistic regression is trained on the train
split per feature set (text bag of words and of adjacent word pairs, with and without the
planted cue words; audio and vision time-mean and time-std over valid frames; all together)
and scored on valid and test. The word pairs let a linear probe read negation ("not dull").
"""
import numpy as np

from cider_jax import tokens


def fit_logreg(x, y, num_classes, l2=1e-2, steps=300, lr=0.5):
  """Multinomial logistic regression by full-batch gradient descent on standardised x.

  x: (N, D) float, y: (N,) int. Returns predict(x) -> (N,) int.
  """
  x = np.asarray(x, np.float64)
  mu, sd = x.mean(0), x.std(0) + 1e-6
  z = (x - mu) / sd
  onehot = np.eye(num_classes)[y]
  w = np.zeros((z.shape[1], num_classes))
  b = np.zeros(num_classes)
  for _ in range(steps):
    logits = z @ w + b
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    g = (p - onehot) / len(y)
    w -= lr * (z.T @ g + l2 * w)
    b -= lr * g.sum(0)
  return lambda x_new: np.argmax(((np.asarray(x_new, np.float64) - mu) / sd) @ w + b, axis=1)


def bag_of_words(ids, mask, vocab, drop_ids=()):
  """(N, |vocab|) presence of each vocab id among the attended tokens, minus `drop_ids`."""
  ids = np.where(mask > 0, ids, 0)
  keep = np.setdiff1d(vocab, np.asarray(drop_ids, np.int64))
  return (ids[:, :, None] == keep[None, None, :]).any(axis=1).astype(np.float32)


def bag_of_words_sparse(ids, mask, vocab):
  """(N, |vocab|) float32 presence of each id of the sorted `vocab` among the attended
  tokens, built by scatter: memory N * |vocab|, not N * L * |vocab| (large vocabularies)."""
  vocab = np.asarray(vocab, np.int64)
  ids = np.where(mask > 0, ids, -1).astype(np.int64)
  out = np.zeros((ids.shape[0], vocab.size), np.float32)
  if vocab.size == 0:
    return out
  col = np.searchsorted(vocab, ids).clip(0, vocab.size - 1)
  hit = (ids >= 0) & (vocab[col] == ids)
  rows = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)
  out[rows[hit], col[hit]] = 1.0
  return out


def text_probe(train_ids, train_mask, train_labels, evals, num_classes, min_count=2,
               special: tokens.SpecialTokens = tokens.BERT):
  """Accuracy of a bag-of-words logistic regression trained on one set of texts.

  train_ids, train_mask: (N, L) token ids and attention mask; train_labels: (N,) int.
  evals: {name: (ids (M, L), mask (M, L), labels (M,))}. The vocabulary is the non-special
  tokens found in at least `min_count` training texts. Returns {name: accuracy}.
  """
  ids = np.where(train_mask > 0, train_ids, 0).astype(np.int64)
  doc = np.unique(np.stack([np.repeat(np.arange(ids.shape[0]), ids.shape[1]),
                            ids.reshape(-1)]), axis=1)[1]
  words, df = np.unique(doc, return_counts=True)
  vocab = np.setdiff1d(words[df >= min_count], special.ids)
  predict = fit_logreg(bag_of_words_sparse(train_ids, train_mask, vocab),
                       np.asarray(train_labels, np.int64), num_classes)
  return {name: float(np.mean(predict(bag_of_words_sparse(i, m, vocab)) == np.asarray(y)))
          for name, (i, m, y) in evals.items()}


def bigram_codes(ids, mask, vocab_size=1 << 20):
  """(N, L-1) codes of adjacent attended token pairs (first * vocab_size + second); -1 where
  either token is not attended."""
  ids = np.where(mask > 0, ids, 0).astype(np.int64)
  both = (mask[:, :-1] > 0) & (mask[:, 1:] > 0)
  return np.where(both, ids[:, :-1] * vocab_size + ids[:, 1:], -1)


def bag_of_bigrams(ids, mask, vocab, drop_ids=()):
  """(N, |vocab|) presence of each pair code of `vocab` among the adjacent attended pairs,
  pairs containing one of `drop_ids` excluded."""
  drop = np.asarray(drop_ids, np.int64)
  ids = np.where(np.isin(ids, drop), 0, ids)
  codes = bigram_codes(ids, mask)
  return (codes[:, :, None] == vocab[None, None, :]).any(axis=1).astype(np.float32)


def time_stats(x, mask):
  """(N, 2D) mean and std over the valid frames of x (N, T, D) with mask (N, T)."""
  m = mask[:, :, None]
  count = np.maximum(m.sum(1), 1.0)
  mean = (x * m).sum(1) / count
  var = (((x - mean[:, None, :]) ** 2) * m).sum(1) / count
  return np.concatenate([mean, np.sqrt(var)], axis=1)


def signal_report(splits, cue_ids, task='binary', special: tokens.SpecialTokens = tokens.BERT):
  """{feature set: {'valid': acc, 'test': acc}} of probes trained on splits['train'].

  cue_ids: {'pos': ids, 'neg': ids} of the planted cue words (synthetic.cue_token_ids()).
  special: the special tokens of the texts' vocabulary, left out of the bags of words
  (`tokens.from_tokenizer_dir` of the tokenizer's folder; bert-base-uncased's by default).
  Also reports 'cue_precision': in each split, the fraction of examples containing a cue
  word whose label is the cue's class (train/valid high, test low when the cue is planted).
  """
  train = splits['train']
  ids_train = np.where(train.text_mask > 0, train.text_ids, 0)
  vocab = np.setdiff1d(np.unique(ids_train), special.ids)
  codes = bigram_codes(train.text_ids, train.text_mask)
  pairs, pair_counts = np.unique(codes[codes >= 0], return_counts=True)
  pairs = pairs[pair_counts >= 3]  # pairs seen at least 3 times in train
  cues = np.concatenate([cue_ids['pos'], cue_ids['neg']])

  def text(s, drop=()):
    return np.concatenate([bag_of_words(s.text_ids, s.text_mask, vocab, drop),
                           bag_of_bigrams(s.text_ids, s.text_mask, pairs, drop)], 1)
  feats = {
      'text': text,
      'text_without_cue': lambda s: text(s, cues),
      'audio': lambda s: time_stats(s.audio, s.audio_mask),
      'vision': lambda s: time_stats(s.vision, s.vision_mask),
  }
  feats['all'] = lambda s: np.concatenate([feats[k](s) for k in ('text', 'audio', 'vision')], 1)
  num_classes = 3 if task == 'binary' else 7
  report = {}
  for name, f in feats.items():
    predict = fit_logreg(f(train), train.labels(task), num_classes)
    report[name] = {k: float(np.mean(predict(f(splits[k])) == splits[k].labels(task)))
                    for k in ('valid', 'test')}
  report['cue_precision'] = {k: _cue_precision(splits[k], cue_ids) for k in splits}
  report['majority'] = {k: float(np.mean(splits[k].label3 == np.bincount(
      train.label3).argmax())) for k in ('valid', 'test')}
  return report


def _cue_precision(split, cue_ids):
  ids = np.where(split.text_mask > 0, split.text_ids, 0)
  pos = np.isin(ids, cue_ids['pos']).any(1)
  neg = np.isin(ids, cue_ids['neg']).any(1)
  hits = (pos & (split.label3 == 2)).sum() + (neg & (split.label3 == 0)).sum()
  return float(hits / max(1, (pos.sum() + neg.sum())))


def format_report(report) -> str:
  lines = [f"{'features':<18} {'valid':>7} {'test':>7}"]
  for name, acc in report.items():
    if name == 'cue_precision':
      continue
    lines.append(f"{name:<18} {acc['valid']:>7.3f} {acc['test']:>7.3f}")
  lines.append('cue precision      ' + '  '.join(
      f'{k} {v:.3f}' for k, v in report['cue_precision'].items()))
  return '\n'.join(lines)
