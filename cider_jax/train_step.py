"""The MSSD training iteration (docs/model.md §4) as one compiled function.

  step_fn = make_train_step(model, tx, labels, config, axis_name='batch')   # pmapped
  state, metrics = step_fn(state, batch)

Inside one call: RMFM keep-masks are sampled from per-example keys
fold_in(fold_in(rng, step), global example index); the teacher pass on the complete input
and its Adam update θ0 → θ1; the student pass on the masked input through θ1 with the
teacher's targets (θ0, gradients stopped); the second Adam update with g_teacher + g_student
(the original never clears gradients between the two); optionally the counterfactual pass of
the masked input for debiased training accuracy. How the updates are computed is the
business of updates.Iteration (the same calls for every form).
"""
import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp

from cider_jax import counterfactual, losses, maci, masks, tokens, updates

MODALITIES = ('text', 'audio', 'vision')
INPUT_KEYS = ('text_ids', 'text_mask', 'text_segments', 'audio', 'audio_mask', 'vision',
              'vision_mask')
LOSS_KEYS = ('loss_task', 'loss_task_m', 'loss_rep', 'loss_attn', 'loss_rec_text',
             'loss_rec_audio', 'loss_rec_vision', 'loss')


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # () int32
  params: Any
  opt_state: Any
  rng: jax.Array           # base PRNG key of the run (raw uint32 (2,))
  consts: Any              # cls_feats (C, D), cls_probs (C,), bias_table (V,) bool, and the
                           # audio / vision standardisation statistics ({m}_mean, {m}_std (D,))


def model_inputs(batch, consts):
  """The model's inputs from a batch: audio and vision standardised on their valid frames with
  the train-split statistics of `consts` (data/standardize.py; consts without them, or the
  identity ones of data.standardize=False, leave the features exactly as they are)."""
  inputs = {k: batch[k] for k in INPUT_KEYS}
  for m in ('audio', 'vision'):
    if f'{m}_mean' in consts:
      x, valid = inputs[m], inputs[f'{m}_mask'][..., None] > 0
      inputs[m] = jnp.where(valid, (x - consts[f'{m}_mean']) / consts[f'{m}_std'], x)
  return inputs


def prototype_inputs(consts, batch_size: int):
  """cls_feats (C, D) → (C, B, D); cls_probs (C,) → (B, C). Per-sample forms pass through."""
  feats, probs = consts['cls_feats'], consts['cls_probs']
  if feats.ndim == 2:
    feats = jnp.broadcast_to(feats[:, None, :], (feats.shape[0], batch_size, feats.shape[1]))
  if probs.ndim == 1:
    probs = jnp.broadcast_to(probs[None, :], (batch_size, probs.shape[0]))
  return feats, probs


def masked_inputs(inputs, text_keep, audio_keep, vision_keep,
                  special: tokens.SpecialTokens = tokens.BERT):
  """Dropped tokens → [UNK], dropped frames → 0 (attention/validity masks unchanged)."""
  m = masks.apply_keep({'text': inputs['text_ids'], 'text_mask': inputs['text_mask'],
                        'audio': inputs['audio'], 'vision': inputs['vision']},
                       text_keep, audio_keep, vision_keep, unk_id=special.unk)
  return dict(inputs, text_ids=m['text'], audio=m['audio'], vision=m['vision'])


def _global(x, axis_name):
  """Sum over the devices of `axis_name`; the identity over one device (no all-reduce copy)."""
  if not axis_name or jax.lax.axis_size(axis_name) == 1:
    return x
  return jax.lax.psum(x, axis_name)


def student_losses(out, target, inputs, keeps, valid, cfg_loss, global_sum, kl_rows):
  """The student's loss (docs/model.md §4, step 2) and its terms, each a global mean."""
  vmask = valid[:, None]
  dropped = {m: (inputs[f'{m}_mask'] - keep) * vmask for m, keep in zip(MODALITIES, keeps)}
  terms = {
      'loss_task_m': losses.nll(out['logp'], inputs['label'], valid),
      'loss_rep': losses.representation(out['joint_rep'], target['joint_rep'], valid),
      'loss_attn': losses.attention_kl(target['attn_qk'], out['attn_qk'], valid, kl_rows),
      'loss_rec_text': losses.reconstruction(out['text_recon'], target['text_hidden'],
                                             dropped['text']),
      'loss_rec_audio': losses.reconstruction(out['audio_recon'], inputs['audio'],
                                              dropped['audio']),
      'loss_rec_vision': losses.reconstruction(out['vision_recon'], inputs['vision'],
                                               dropped['vision']),
  }
  vals = {}
  for k, (num, den) in terms.items():
    den = global_sum(den)
    vals[k] = num / (den + 1e-6) if k.startswith('loss_rec') else num / den
  total = (vals['loss_task_m'] + cfg_loss.w_rep * vals['loss_rep']
           + cfg_loss.w_attn * vals['loss_attn']
           + cfg_loss.w_rec * (vals['loss_rec_text'] + vals['loss_rec_audio']
                               + vals['loss_rec_vision']))
  return total, vals


def accuracy(logp, y, valid, global_sum):
  return global_sum(jnp.sum((jnp.argmax(logp, -1) == y) * valid)) / global_sum(jnp.sum(valid))


def train_step(state: TrainState, batch, keeps=None, *, model, tx, labels, config,
               axis_name: Optional[str] = 'batch', return_grads: bool = False,
               special: tokens.SpecialTokens = tokens.BERT, lr_factor=None):
  """One MSSD iteration on a (per-device) batch.

  batch: flat dict of INPUT_KEYS + label (B,) + valid (B,) (+ index). keeps: optional
  (text_keep (B, L), audio_keep (B, La), vision_keep (B, Lv)); sampled when None.
  special: the text encoder's special tokens ([UNK] for dropped, [MASK] for non-bias words).
  lr_factor: step → factor of the learning rates (optim.lr_factor); None: constant.
  Returns (new state, metrics) — metrics are global (summed over `axis_name`).
  """
  global_sum = functools.partial(_global, axis_name=axis_name)
  inputs = model_inputs(batch, state.consts)
  y, valid = batch['label'], batch['valid'].astype(jnp.float32)
  cls_feats, cls_probs = prototype_inputs(state.consts, y.shape[0])
  device = jax.lax.axis_index(axis_name) if axis_name else 0
  k_teacher, k_student, k_cf = dropout_keys(state, device)
  keeps = sampled_keeps(state, inputs, device) if keeps is None else keeps
  x_m = masked_inputs(inputs, *keeps, special=special)
  passes = [inputs, x_m]
  if config.train.counterfactual_metrics and maci.enabled(model):
    passes.append(dict(x_m, text_ids=counterfactual.counterfactual_ids_jax(
        x_m['text_ids'], state.consts['bias_table'], special)))
  it = updates.Iteration.begin(state.params, state.opt_state, [x['text_ids'] for x in passes],
                               tx=tx, labels=labels, config=config, ops=model.ops,
                               axis_name=axis_name, lead=axis_name is not None,
                               scale=_scale(lr_factor, state.step))

  def apply(theta, part, rng, reconstruct=False):
    params, x = it.view(theta, passes[part], part)
    return model.apply({'params': params}, x, cls_feats, cls_probs,
                       deterministic=bool(config.model.deterministic), reconstruct=reconstruct,
                       rngs={'dropout': rng})

  def teacher_loss(theta):                                    # complete input, at θ0
    out = apply(theta, 0, k_teacher)
    num, den = losses.nll(out['logp'], y, valid)
    return num / global_sum(den), out

  (loss_t, out_t), g_t = jax.value_and_grad(teacher_loss, has_aux=True)(it.theta)
  g_t = global_sum(g_t)
  it, gnorm_t = it.update(g_t, skip=('student_only',))        # θ0 → θ1
  target = jax.lax.stop_gradient(
      {k: out_t[k] for k in ('joint_rep', 'attn_qk', 'text_hidden')})

  def student_loss(theta):                                    # masked input, at θ1
    out = apply(theta, 1, k_student, reconstruct=True)
    total, vals = student_losses(out, target, dict(inputs, label=y), keeps, valid,
                                 config.loss, global_sum, model.ops.attention_kl)
    return total, (vals, out)

  (loss_s, (vals, out_s)), g_s = jax.value_and_grad(student_loss, has_aux=True)(it.theta)
  g_2 = global_sum(g_s)
  if config.train.accumulate_teacher_grad:                    # as the original: never cleared
    g_2 = jax.tree.map(jnp.add, g_t, g_2)
  out_cf = apply(it.theta, 2, k_cf) if len(passes) > 2 else None   # monitoring, at θ1
  it_2, gnorm_2 = it.update(g_2, after=None if out_cf is None else out_cf['logp'])  # θ1 → θ2
  params, opt_state = it_2.finish()

  metrics = {k: global_sum(v) for k, v in vals.items()}
  metrics.update(loss_task=global_sum(loss_t), loss=global_sum(loss_s),
                 grad_norm_teacher=gnorm_t, grad_norm_student=gnorm_2,
                 acc_m=accuracy(out_s['logp'], y, valid, global_sum))
  if out_cf is not None:
    debiased = out_s['logp'] - config.maci.get('train_tau', 1.0) * out_cf['logp']
    metrics.update(acc_m_debiased=accuracy(debiased, y, valid, global_sum),
                   logp_cf=out_cf['logp'])
  if return_grads:
    metrics['grads'] = (it.dense_grads(g_t), it.dense_grads(g_2))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _scale(lr_factor, step):
  return 1.0 if lr_factor is None else lr_factor(step)


def sampled_keeps(state, inputs, device):
  """RMFM keep-masks (text, audio, vision) of a per-device batch, from per-example keys
  fold_in(fold_in(rng, step), global example index)."""
  B = inputs['text_ids'].shape[0]
  keys = masks.example_keys(state.rng, state.step, device * B + jnp.arange(B))
  return masks.train_keep(keys, inputs['text_mask'], inputs['audio_mask'], inputs['vision_mask'])


def dropout_keys(state, device):
  """The dropout keys of the teacher, student and counterfactual passes on this device."""
  step_key = jax.random.fold_in(state.rng, state.step)
  return jax.random.split(jax.random.fold_in(jax.random.fold_in(step_key, 1 << 30), device), 3)


def base_train_step(state: TrainState, batch, keeps=None, *, model, tx, labels, config,
                    axis_name: Optional[str] = 'batch', return_grads: bool = False,
                    special: tokens.SpecialTokens = tokens.BERT, lr_factor=None):
  """One iteration of a base model other than CIDer (MSSD is CIDer's own): one Adam update on
  the RMFM-masked input, loss = task NLL through the head + the base's own `aux_loss` (if it
  returns one). Arguments and metrics as `train_step`."""
  global_sum = functools.partial(_global, axis_name=axis_name)
  inputs = model_inputs(batch, state.consts)
  y, valid = batch['label'], batch['valid'].astype(jnp.float32)
  cls_feats, cls_probs = prototype_inputs(state.consts, y.shape[0])
  device = jax.lax.axis_index(axis_name) if axis_name else 0
  k_train, _, k_cf = dropout_keys(state, device)
  keeps = sampled_keeps(state, inputs, device) if keeps is None else keeps
  passes = [masked_inputs(inputs, *keeps, special=special)]
  if config.train.counterfactual_metrics and maci.enabled(model):
    passes.append(maci.counterfactual_inputs(passes[0], state.consts['bias_table'], special))
  it = updates.Iteration.begin(state.params, state.opt_state, [x['text_ids'] for x in passes],
                               tx=tx, labels=labels, config=config, ops=model.ops,
                               axis_name=axis_name, lead=axis_name is not None, updates=1,
                               scale=_scale(lr_factor, state.step))

  def apply(theta, part, rng):
    params, x = it.view(theta, passes[part], part)
    return model.apply({'params': params}, x, cls_feats, cls_probs,
                       deterministic=bool(config.model.deterministic), rngs={'dropout': rng})

  def loss_fn(theta):
    out = apply(theta, 0, k_train)
    num, den = losses.nll(out['logp'], y, valid)
    task = num / global_sum(den)
    # the base's own loss, a mean over this device's batch: weighted by its share of examples
    share = jnp.sum(valid) / global_sum(jnp.sum(valid))
    aux = jnp.asarray(out.get('aux_loss', 0.0), jnp.float32) * share
    return task + aux, (task, aux, out)

  (loss, (task, aux, out)), g = jax.value_and_grad(loss_fn, has_aux=True)(it.theta)
  g = global_sum(g)
  out_cf = apply(it.theta, 1, k_cf) if len(passes) > 1 else None   # monitoring, before
  it_1, gnorm = it.update(g, after=None if out_cf is None else out_cf['logp'])
  params, opt_state = it_1.finish()
  metrics = {'loss': global_sum(loss), 'loss_task_m': global_sum(task),
             'loss_base': global_sum(aux), 'grad_norm_student': gnorm,
             'acc_m': accuracy(out['logp'], y, valid, global_sum)}
  if out_cf is not None:
    debiased = out['logp'] - config.maci.get('train_tau', 1.0) * out_cf['logp']
    metrics.update(acc_m_debiased=accuracy(debiased, y, valid, global_sum),
                   logp_cf=out_cf['logp'])
  if return_grads:
    metrics['grads'] = it.dense_grads(g)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(model, tx, labels, config, axis_name: Optional[str] = 'batch',
                    return_grads: bool = False, special: tokens.SpecialTokens = tokens.BERT,
                    lr_factor=None):
  """pmapped (axis_name set) or jitted (axis_name None) step; the state buffers are donated.
  CIDer trains with MSSD (`train_step`), every other base model with `base_train_step`.
  lr_factor: the learning-rate schedule (optim.lr_factor of the run's length); None: constant."""
  step = train_step if config.model.get('name', 'cider') == 'cider' else base_train_step
  fn = functools.partial(step, model=model, tx=tx, labels=labels, config=config,
                         axis_name=axis_name, return_grads=return_grads, special=special,
                         lr_factor=lr_factor)
  if axis_name:
    return jax.pmap(fn, axis_name=axis_name, donate_argnums=(0,))
  return jax.jit(fn, donate_argnums=(0,))
