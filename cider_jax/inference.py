"""Class probabilities for new samples from a trained run: load once, predict many.

  predictor = cider_jax.Predictor('runs/quickstart')   # restores and reads everything once
  out = predictor(['what a wonderful film'], audio, vision)
  out['probs'], out['probs_debiased']   # (N, C) factual / debiased softmax(y − τ·y_cf)
  out['labels']                          # (N,) argmax of the debiased prediction
  cider_jax.predict(workdir, texts, audio, vision)     # one call: Predictor(workdir)(…)

audio / vision: a list of (T_i, D) arrays (any number of frames; cut or zero-padded to the
run's length) or one (N, T, D) array with optional lengths (N,). Texts are tokenised with the
run's tokenizer and cut to its length L (out['text_truncated'] marks the texts that were
longer); `text_bert` (N, 3, L') token ids / attention mask / segment ids, the MMSA layout, can
be given instead (a row longer than L is a bad row, never cut). τ: the run's evaluation report
(chosen on the validation split), 0 when the run has no report, unless given: a given τ must
be a finite number >= 0 (ValueError otherwise).

What is read once: the best checkpoint's parameters (from abstract shapes, no optimizer
state), the train-split constants (prototypes, bias words, audio / vision standardisation
statistics, applied inside the compiled step), the tokenizer and τ. Batches are padded to a
few fixed sizes (`buckets`, default 1, 8, 64; more examples than the largest run in chunks of
it: on 2 CPU cores chunks of 64 ran a batch of 256 faster than one padded batch of 256, see
docs/performance.md), each compiled once on first use, so a stream of single utterances reuses
one program and a batch of 256 another.
Compiled programs go to the run's persistent XLA cache (config.train.compilation_cache) unless
the process already has one: a second process loads them instead of compiling (JAX reads the
cache folder when it first compiles: a process that compiled something before the Predictor
keeps the cache it had). Padding never changes a prediction (each example is computed on its
own), except under model.positions='reference', the original's batch-position quirk.
"""
import functools
from typing import NamedTuple, Optional, Sequence

import jax
import ml_collections
import numpy as np

from cider_jax import checkpoint as ckpt_lib
from cider_jax import eval_step, evaluate, maci, parallel
from cider_jax.models import bert
from cider_jax.train_step import INPUT_KEYS

DEFAULT_BUCKETS = (1, 8, 64)
CLASS_NAMES = {3: ('negative', 'neutral', 'positive'),
               7: ('-3', '-2', '-1', '0', '+1', '+2', '+3')}


class BadRow(NamedTuple):
  """One example that cannot be predicted: its row, the field at fault and why."""
  row: int
  field: str        # 'text', 'audio' or 'vision'
  problem: str

  def __str__(self):
    return f'{self.field}[{self.row}]: {self.problem}'


def bucket_sizes(n: int, buckets: Sequence[int]) -> list:
  """The padded batch sizes that cover n examples: chunks of the largest bucket, then the
  smallest bucket that holds the rest. bucket_sizes(300, (1, 8, 64, 256)) == [256, 64]."""
  top, out = max(buckets), []
  while n > top:
    out.append(top)
    n -= top
  if n > 0:
    out.append(min(b for b in buckets if b >= n))
  return out


def frames(name: str, x, lengths, T: int, D: int):
  """Features at the run's shape: (N, T, D) float32, validity mask (N, T) float32, bad rows.

  x: a list of (T_i, D) arrays or an (N, T', D) array; lengths (N,) counts the valid leading
  frames of each (all of them when None). Longer inputs are cut to T, shorter zero-padded.
  A row of another width, without frames, or with NaN / infinite valid frames is a bad row.
  """
  items = list(x)
  out = np.zeros((len(items), T, D), np.float32)
  mask = np.zeros((len(items), T), np.float32)
  bad = []
  for i, item in enumerate(items):
    try:
      a = np.asarray(item, np.float32)
    except (TypeError, ValueError) as e:
      bad.append(BadRow(i, name, f'not a numeric array ({e})'))
      continue
    if a.ndim != 2 or a.shape[1] != D:
      bad.append(BadRow(i, name, f'expected (frames, {D}) features, got {a.shape}'))
      continue
    n = a.shape[0] if lengths is None else int(lengths[i])
    if a.shape[0] == 0:
      bad.append(BadRow(i, name, 'no frames'))
      continue
    if n < 1 or n > a.shape[0]:
      bad.append(BadRow(i, name, f'length {n}: expected 1 to {a.shape[0]} frames'))
      continue
    n = min(n, T)
    if not np.all(np.isfinite(a[:n])):
      bad.append(BadRow(i, name, 'NaN or infinite features'))
      continue
    out[i, :n], mask[i, :n] = a[:n], 1.0
  return out, mask, bad


def token_rows(text_bert, L: int, vocab_size: int):
  """MMSA token rows (N, 3, L') → ids, attention mask, segments (N, L) and bad rows.

  A row whose text is longer than L tokens, has no word between [CLS] and [SEP] or ids beyond
  the vocabulary is a bad row.
  """
  t = np.asarray(text_bert)
  if t.ndim != 3 or t.shape[1] != 3:
    raise ValueError(f'text_bert: expected (N, 3, L) token ids / mask / segments, got {t.shape}')
  n, width = t.shape[0], min(t.shape[2], L)
  ids, mask, seg = (np.zeros((n, L), dt) for dt in (np.int32, np.float32, np.int32))
  ids[:, :width], mask[:, :width], seg[:, :width] = t[:, 0, :width], t[:, 1, :width], t[:, 2, :width]
  length = t[:, 1].sum(axis=1)
  bad = []
  for i in range(n):
    if length[i] > L:
      bad.append(BadRow(i, 'text', f'{int(length[i])} tokens: the run takes at most {L}'))
    elif length[i] <= 2:
      bad.append(BadRow(i, 'text', 'empty text (no token between [CLS] and [SEP])'))
    elif ids[i].max() >= vocab_size or ids[i].min() < 0:
      bad.append(BadRow(i, 'text', f'token ids beyond the vocabulary of {vocab_size}'))
  return ids, mask, seg, bad


def check_tau(tau) -> float:
  """τ as a float: a finite number >= 0, else ValueError saying so."""
  try:
    value = float(tau)
  except (TypeError, ValueError):
    raise ValueError(f'tau {tau!r}: expected a number (a finite τ >= 0)') from None
  if not np.isfinite(value) or value < 0:
    raise ValueError(f'tau {value!r}: τ must be a finite number >= 0 (0 = the factual '
                     'prediction)')
  return value


def _softmax(z):
  z = np.exp(z - z.max(axis=1, keepdims=True))
  return z / z.sum(axis=1, keepdims=True)


def _use_compilation_cache(path: str) -> None:
  """The persistent XLA cache at `path`, unless the process already has one ('' = off)."""
  if path and not jax.config.jax_compilation_cache_dir:
    parallel.enable_compilation_cache(path)


class Predictor:
  """A trained run, loaded once, that predicts new samples (see the module docstring).

  Attributes: config, spec (shapes), tokenizer, class_names (C,), tau, tau_source ('report',
  'given' or 'none'), buckets, compiled_buckets (the batch sizes compiled so far).
  """

  def __init__(self, workdir: str, tau: Optional[float] = None,
               buckets: Sequence[int] = DEFAULT_BUCKETS,
               compilation_cache: Optional[str] = None):
    """workdir: a training run (checkpoints/best, constants.npz); tau: overrides the report's
    (a finite number >= 0, checked before anything is read); buckets: the padded batch sizes;
    compilation_cache: a folder for compiled programs ('' = none; None = the run's
    config.train.compilation_cache)."""
    if not buckets or any(int(b) < 1 for b in buckets):
      raise ValueError(f'buckets {tuple(buckets)!r}: expected batch sizes >= 1')
    if tau is not None:
      tau = check_tau(tau)
    evaluate.check_trained_run(workdir)
    meta = ckpt_lib.Checkpoints(workdir).read_meta('best', required=('config', 'spec'))
    if meta is None:
      raise evaluate.EvaluationError(f'no best checkpoint under {workdir!r}')
    self.workdir = workdir
    self.config = ml_collections.ConfigDict(meta['config'])
    _use_compilation_cache(self.config.train.get('compilation_cache', '')
                           if compilation_cache is None else compilation_cache)
    best = evaluate.restore_best(self.config, workdir)
    self.spec, self.special, self.model = best.spec, best.special, best.model
    self.params, self.consts = jax.device_put((best.params, best.consts))
    self.vocab_size = int(self.model.base.bert.vocab_size)
    self.class_names = CLASS_NAMES.get(self.spec.num_classes,
                                       tuple(str(k) for k in range(self.spec.num_classes)))
    self.buckets = tuple(sorted({int(b) for b in buckets}))
    self.tau, self.tau_source = _run_tau(workdir, tau)
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    self.tokenizer = AutoTokenizer.from_pretrained(
        bert.resolve_path(self.config.model.text_encoder.path))
    self._step = jax.jit(functools.partial(eval_step.eval_step, model=self.model,
                                           special=self.special))
    self._programs = {}

  # ---------------------------------------------------------------------------- inputs

  def prepare(self, texts=None, audio=(), vision=(), audio_lengths=None, vision_lengths=None,
              text_bert=None):
    """(inputs, bad rows): the model's inputs (N, …) at the run's shapes and every example
    that cannot be predicted (BadRow, sorted by row). Give `texts` (N strings) or
    `text_bert` (N, 3, L') token ids, mask and segments. inputs['text_truncated'] (N,) bool
    marks the texts longer than the run's L tokens, which were cut to L (never a token row:
    one too long is a bad row)."""
    L, La, Lv = self.spec.seq_lens
    Da, Dv = self.spec.feature_dims
    if (texts is None) == (text_bert is None):
      raise ValueError('give either the texts or their token ids (text_bert)')
    if texts is not None:
      texts = list(texts)
      n = len(texts)
      bad = [BadRow(i, 'text', 'empty text' if isinstance(t, str) else
                    f'expected a string, got {type(t).__name__}')
             for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
      safe = [t if isinstance(t, str) and t.strip() else '.' for t in texts] or ['.']
      enc = self.tokenizer(safe, padding='max_length', truncation=True, max_length=L,
                           return_tensors='np')
      ids = enc['input_ids'][:n].astype(np.int32)
      mask = enc['attention_mask'][:n].astype(np.float32)
      seg = enc['token_type_ids'][:n].astype(np.int32)
      # only a text that fills all L positions may have been cut: those are tokenised again
      # uncut to tell (the others are not tokenised twice)
      full = np.flatnonzero(mask.sum(axis=1) >= L)
      truncated = np.zeros(n, bool)
      if full.size:
        whole = self.tokenizer([safe[i] for i in full], truncation=False,
                               verbose=False)['input_ids']
        truncated[full] = [len(t) > L for t in whole]
    else:
      ids, mask, seg, bad = token_rows(text_bert, L, self.vocab_size)
      n = len(ids)
      truncated = np.zeros(n, bool)
    counts = [len(x) for x in (audio, vision, audio_lengths, vision_lengths) if x is not None]
    if any(c != n for c in counts):
      raise ValueError(f'texts, audio, vision (and their lengths) must have the same number of '
                       f'samples, got {n} and {counts}')
    a, am, bad_a = frames('audio', audio, audio_lengths, La, Da)
    v, vm, bad_v = frames('vision', vision, vision_lengths, Lv, Dv)
    if self.spec.aligned:
      am = vm = mask
    inputs = {'text_ids': ids, 'text_mask': mask, 'text_segments': seg,
              'audio': a, 'audio_mask': am, 'vision': v, 'vision_mask': vm,
              'text_truncated': truncated}
    return inputs, sorted(bad + bad_a + bad_v)

  # ---------------------------------------------------------------------------- prediction

  def compile(self, batch_size: int):
    """The compiled eval step for a padded batch of `batch_size` (compiled once)."""
    if batch_size not in self._programs:
      L, La, Lv = self.spec.seq_lens
      Da, Dv = self.spec.feature_dims
      shapes = {'text_ids': ((L,), np.int32), 'text_mask': ((L,), np.float32),
                'text_segments': ((L,), np.int32), 'audio': ((La, Da), np.float32),
                'audio_mask': ((La,), np.float32), 'vision': ((Lv, Dv), np.float32),
                'vision_mask': ((Lv,), np.float32)}
      example = {k: jax.ShapeDtypeStruct((batch_size,) + s, d) for k, (s, d) in shapes.items()}
      self._programs[batch_size] = self._step.lower(self.params, self.consts, example).compile()
    return self._programs[batch_size]

  @property
  def compiled_buckets(self) -> tuple:
    return tuple(sorted(self._programs))

  def predict_inputs(self, inputs: dict, tau: Optional[float] = None, progress: bool = False):
    """Predictions for prepared inputs (`prepare`), in chunks of the buckets' sizes; τ, when
    given, a finite number >= 0 (ValueError otherwise)."""
    tau = self.tau if tau is None else check_tau(tau)
    n = len(inputs['text_ids'])
    logp, logp_cf = [], []
    start = 0
    sizes = bucket_sizes(n, self.buckets)
    bar = None
    if progress:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=n, unit='example', desc='predict')
    for size in sizes:
      count = min(size, n - start)
      # padding rows repeat the chunk's last example: valid inputs, dropped from the output
      rows = np.minimum(np.arange(start, start + size), start + count - 1)
      out = self.compile(size)(self.params, self.consts,
                               {k: inputs[k][rows] for k in INPUT_KEYS})
      out = jax.device_get(out)
      logp.append(np.asarray(out['logp'])[:count])
      if 'logp_cf' in out:                  # absent when the run has maci.enabled=False
        logp_cf.append(np.asarray(out['logp_cf'])[:count])
      start += count
      if bar is not None:
        bar.update(count)
    if bar is not None:
      bar.close()
    C = self.spec.num_classes
    logp = np.concatenate(logp) if logp else np.zeros((0, C), np.float32)
    truncated = np.asarray(inputs.get('text_truncated', np.zeros(n, bool)), bool)
    if not maci.enabled(self.model):        # factual only: no counterfactual pass, no τ
      return {'probs': np.exp(np.asarray(logp, np.float64)), 'probs_debiased': None,
              'labels': logp.argmax(axis=1), 'labels_factual': logp.argmax(axis=1),
              'logp': logp, 'logp_cf': None, 'tau': None, 'text_truncated': truncated}
    logp_cf = np.concatenate(logp_cf) if logp_cf else np.zeros((0, C), np.float32)
    debiased = np.asarray(logp, np.float64) - tau * np.asarray(logp_cf, np.float64)
    return {'probs': np.exp(np.asarray(logp, np.float64)), 'probs_debiased': _softmax(debiased),
            'labels': debiased.argmax(axis=1), 'labels_factual': logp.argmax(axis=1),
            'logp': logp, 'logp_cf': logp_cf, 'tau': tau, 'text_truncated': truncated}

  def __call__(self, texts=None, audio=(), vision=(), audio_lengths=None, vision_lengths=None,
               *, text_bert=None, tau: Optional[float] = None, progress: bool = False) -> dict:
    """{'probs', 'probs_debiased': (N, C), 'labels', 'labels_factual': (N,) int, 'logp',
    'logp_cf': (N, C) log-probabilities of the factual and counterfactual passes, 'tau',
    'text_truncated': (N,) bool, the texts longer than the run's L tokens, cut to L}; a run
    trained with maci.enabled=False has no counterfactual pass: 'probs_debiased', 'logp_cf' and
    'tau' are None and 'labels' are the factual ones.

    Raises ValueError naming the first bad row (`prepare` lists them all).
    """
    inputs, bad = self.prepare(texts, audio, vision, audio_lengths, vision_lengths, text_bert)
    if bad:
      more = f' (and {len(bad) - 1} more bad rows)' if len(bad) > 1 else ''
      raise ValueError(f'{bad[0]}{more}')
    return self.predict_inputs(inputs, tau, progress)


def _run_tau(workdir: str, tau: Optional[float]):
  """(τ, source): the given value, else the report's (chosen on validation), else 0."""
  if tau is not None:
    return check_tau(tau), 'given'
  value = evaluate.read_tau(workdir)   # EvaluationError for a damaged report
  if value is not None:
    return value, 'report'
  return 0.0, 'none'


def predict(workdir: str, texts: Sequence[str], audio, vision, audio_lengths=None,
            vision_lengths=None, tau: Optional[float] = None) -> dict:
  """One call: `Predictor(workdir, tau)(texts, audio, vision, audio_lengths, vision_lengths)`.
  Keep a Predictor to predict more than once: this restores and compiles every time. A given
  τ must be a finite number >= 0 (ValueError before anything is read)."""
  return Predictor(workdir, tau=tau)(texts, audio, vision, audio_lengths, vision_lengths)
