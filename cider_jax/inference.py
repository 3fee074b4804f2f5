"""Class probabilities for new samples from a trained run.

  probs = cider_jax.predict('runs/quickstart', ['what a wonderful film'], audio, vision)

audio / vision: a list of (T_i, D) arrays (any lengths; cut or zero-padded to the run's) or one
(N, T, D) array with optional lengths. Returns {'probs': (N, C), 'probs_debiased': (N, C),
'tau': τ} — τ from the run's evaluation report (chosen on validation) unless given.
"""
import json
import os
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np

from cider_jax import checkpoint as ckpt_lib
from cider_jax import eval_step, evaluate
from cider_jax.models import bert


def _frames(name, x, lengths, T, D):
  items = list(x) if not isinstance(x, np.ndarray) or x.ndim != 3 else list(x)
  out = np.zeros((len(items), T, D), np.float32)
  mask = np.zeros((len(items), T), np.float32)
  for i, a in enumerate(items):
    a = np.asarray(a, np.float32)
    if a.ndim != 2 or a.shape[1] != D:
      raise ValueError(f'{name}[{i}]: expected (frames, {D}) features, got {a.shape}')
    n = min(T, a.shape[0] if lengths is None else int(lengths[i]))
    if not np.all(np.isfinite(a[:n])):
      raise ValueError(f'{name}[{i}]: NaN or infinite features')
    out[i, :n], mask[i, :n] = a[:n], 1.0
  return out, mask


def predict(workdir: str, texts: Sequence[str], audio, vision, audio_lengths=None,
            vision_lengths=None, tau: Optional[float] = None) -> dict:
  """See the module docstring. Only the best checkpoint's parameters are read (no optimizer
  state is built)."""
  meta = ckpt_lib.Checkpoints(workdir).read_meta('best') if os.path.isdir(workdir) else None
  if meta is None:
    raise evaluate.EvaluationError(f'no best checkpoint under {workdir!r}')
  config = ml_collections.ConfigDict(meta['config'])
  best = evaluate.restore_best(config, workdir)
  model, params, consts, spec = best.model, best.params, best.consts, best.spec
  L, La, Lv = spec.seq_lens
  Da, Dv = spec.feature_dims
  if not (len(texts) == len(audio) == len(vision)):
    raise ValueError(f'texts, audio and vision must have the same number of samples, got '
                     f'{len(texts)}, {len(audio)}, {len(vision)}')
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(bert.resolve_path(config.model.text_encoder.path))
  enc = tok(list(texts), padding='max_length', truncation=True, max_length=L, return_tensors='np')
  a, am = _frames('audio', audio, audio_lengths, La, Da)
  v, vm = _frames('vision', vision, vision_lengths, Lv, Dv)
  if spec.aligned:
    am = vm = enc['attention_mask'].astype(np.float32)
  batch = {'text_ids': enc['input_ids'].astype(np.int32),
           'text_mask': enc['attention_mask'].astype(np.float32),
           'text_segments': enc['token_type_ids'].astype(np.int32),
           'audio': a, 'audio_mask': am, 'vision': v, 'vision_mask': vm}
  step = eval_step.make_eval_step(model, axis_name=None, special=best.special)
  out = jax.device_get(step(params, consts, batch))
  if tau is None:
    report = os.path.join(workdir, 'eval', 'report.json')
    tau = 0.0
    if os.path.exists(report):
      with open(report) as f:
        tau = json.load(f)['tau']['value'] or 0.0
  debiased = np.asarray(out['logp'], np.float64) - tau * np.asarray(out['logp_cf'], np.float64)
  debiased = np.exp(debiased - debiased.max(1, keepdims=True))
  return {'probs': np.exp(np.asarray(out['logp'], np.float64)),
          'probs_debiased': debiased / debiased.sum(1, keepdims=True), 'tau': float(tau)}
