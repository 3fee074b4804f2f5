"""Evaluation: factual and counterfactual log-probabilities in one compiled function.

  eval_fn = make_eval_step(model, axis_name='batch')            # pmapped (or jit: None)
  out = eval_fn(params, consts, batch)   # {'logp': (B, C), 'logp_cf': (B, C)}

`logp_cf` only with MACI enabled (maci.factual_and_counterfactual).

The batch may carry keep-masks (`text_keep`, `audio_keep`, `vision_keep`) from the seeded
test-mode masks; the counterfactual text is built on device from the (masked) text and the
bias-word lookup table. `consts` are the evaluation constants (mean prototype for every class,
uniform prior, bias table, audio / vision standardisation statistics), see
run_state.eval_consts.
"""
import functools
from typing import Optional

import jax
import numpy as np

from cider_jax import maci, tokens
from cider_jax.train_step import masked_inputs, model_inputs, prototype_inputs

KEEP_KEYS = ('text_keep', 'audio_keep', 'vision_keep')


def eval_step(params, consts, batch, *, model, special: tokens.SpecialTokens = tokens.BERT):
  """special: the text encoder's special tokens ([UNK] for dropped, [MASK] for non-bias)."""
  inputs = model_inputs(batch, consts)
  if all(k in batch for k in KEEP_KEYS):
    inputs = masked_inputs(inputs, *(batch[k] for k in KEEP_KEYS), special=special)
  B = inputs['text_ids'].shape[0]
  cls_feats, cls_probs = prototype_inputs(consts, B)
  return maci.factual_and_counterfactual(model, params, inputs, cls_feats, cls_probs,
                                        consts['bias_table'], special)


def make_eval_step(model, axis_name: Optional[str] = 'batch',
                   special: tokens.SpecialTokens = tokens.BERT):
  fn = functools.partial(eval_step, model=model, special=special)
  if axis_name:
    return jax.pmap(fn, axis_name=axis_name, in_axes=(0, 0, 0))
  return jax.jit(fn)


def run_batches(eval_fn, params, consts, batches, n_devices: int = 0):
  """Concatenated {'logp', 'logp_cf'} (N, C) over padded batches (padding rows dropped;
  'logp_cf' only where eval_fn returns it).

  batches: iterable of flat dicts with a `valid` (B,) entry. With n_devices > 0, eval_fn is
  pmapped and params/consts are replicated; each batch is split (n_devices, B / n_devices, …).
  """
  outs = {}
  for batch in batches:
    valid = np.asarray(batch['valid']) > 0
    feed = {k: v for k, v in batch.items() if k not in ('label', 'index', 'valid')}
    if n_devices:
      feed = jax.tree.map(lambda x: x.reshape((n_devices, -1) + x.shape[1:]), feed)
    out = jax.device_get(eval_fn(params, consts, feed))
    for k in out:
      outs.setdefault(k, []).append(np.asarray(out[k]).reshape((-1,) + out[k].shape[-1:])[valid])
  return {k: np.concatenate(v) for k, v in outs.items()}
