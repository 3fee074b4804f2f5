"""The MSSD training iteration (REFERENCE §4) as one compiled function.

  step_fn = make_train_step(model, tx, labels, config, axis_name='batch')   # pmapped
  state, metrics = step_fn(state, batch)

Inside one call: RMFM keep-masks are sampled from per-example keys
fold_in(fold_in(rng, step), global example index); the teacher pass on the complete input
and its Adam update θ0 → θ1; the student pass on the masked input through θ1 with the
teacher's targets (θ0, gradients stopped); the second Adam update with g_teacher + g_student
(the original never clears gradients between the two); optionally the counterfactual pass of
the masked input for debiased training accuracy.
"""
import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp

from cider_jax import counterfactual, embedding_rows, losses, masks, optim

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
  consts: Any              # cls_feats (C, D), cls_probs (C,), bias_table (V,) bool


def model_inputs(batch):
  return {k: batch[k] for k in INPUT_KEYS}


def prototype_inputs(consts, batch_size: int):
  """cls_feats (C, D) → (C, B, D); cls_probs (C,) → (B, C). Per-sample forms pass through."""
  feats, probs = consts['cls_feats'], consts['cls_probs']
  if feats.ndim == 2:
    feats = jnp.broadcast_to(feats[:, None, :], (feats.shape[0], batch_size, feats.shape[1]))
  if probs.ndim == 1:
    probs = jnp.broadcast_to(probs[None, :], (batch_size, probs.shape[0]))
  return feats, probs


def masked_inputs(inputs, text_keep, audio_keep, vision_keep):
  """Dropped tokens → [UNK], dropped frames → 0 (attention/validity masks unchanged)."""
  m = masks.apply_keep({'text': inputs['text_ids'], 'text_mask': inputs['text_mask'],
                        'audio': inputs['audio'], 'vision': inputs['vision']},
                       text_keep, audio_keep, vision_keep)
  return dict(inputs, text_ids=m['text'], audio=m['audio'], vision=m['vision'])


def _global(x, axis_name):
  """Sum over the devices of `axis_name`; the identity over one device (no all-reduce copy)."""
  if not axis_name or jax.lax.axis_size(axis_name) == 1:
    return x
  return jax.lax.psum(x, axis_name)


def train_step(state: TrainState, batch, keeps=None, *, model, tx, labels, config,
               axis_name: Optional[str] = 'batch', return_grads: bool = False):
  """One MSSD iteration on a (per-device) batch.

  batch: flat dict of INPUT_KEYS + label (B,) + valid (B,) (+ index). keeps: optional
  (text_keep (B, L), audio_keep (B, La), vision_keep (B, Lv)); sampled when None.
  Returns (new state, metrics) — metrics are global (summed over `axis_name`).
  """
  cfg_loss, cfg_train = config.loss, config.train
  deterministic = bool(config.model.deterministic)
  inputs = model_inputs(batch)
  y, valid = batch['label'], batch['valid'].astype(jnp.float32)
  B = y.shape[0]
  cls_feats, cls_probs = prototype_inputs(state.consts, B)
  step_key = jax.random.fold_in(state.rng, state.step)
  device = jax.lax.axis_index(axis_name) if axis_name else 0
  dropout_key = jax.random.fold_in(jax.random.fold_in(step_key, 1 << 30), device)
  k_teacher, k_student, k_cf = jax.random.split(dropout_key, 3)

  if keeps is None:
    global_index = device * B + jnp.arange(B)
    keys = masks.example_keys(state.rng, state.step, global_index)
    keeps = masks.train_keep(keys, inputs['text_mask'], inputs['audio_mask'],
                             inputs['vision_mask'])
  text_keep, audio_keep, vision_keep = keeps

  def apply(params, x, rng, reconstruct=False):
    return model.apply({'params': params}, x, cls_feats, cls_probs,
                       deterministic=deterministic, reconstruct=reconstruct,
                       rngs=None if deterministic else {'dropout': rng})

  x_m = masked_inputs(inputs, text_keep, audio_keep, vision_keep)
  cf_ids = None
  if cfg_train.counterfactual_metrics:
    cf_ids = counterfactual.counterfactual_ids_jax(x_m['text_ids'], state.consts['bias_table'])
  # under native kernels each parameter's Adam step is one kernel call (optim.apply_update);
  # with axis_name the step runs under pmap (make_train_step), whose parameters are (1, ...)
  native_optim = config.optim if model.kernels == 'native' else None
  lead = axis_name is not None
  rows = None
  if config.optim.get('embedding_rows', True) and embedding_rows.present(state.params):
    ids = [inputs['text_ids'], x_m['text_ids']] + ([cf_ids] if cf_ids is not None else [])
    rows = embedding_rows.Step(state, ids, config, axis_name,
                               functools.partial(_global, axis_name=axis_name),
                               native=native_optim is not None, lead=lead)
  params0 = rows.params if rows else state.params
  opt0 = rows.opt_state if rows else state.opt_state

  def with_rows(x, part, table_rows):
    return x if rows is None else dict(x, text_word_rows=rows.rows(table_rows, part))

  # ---------------------------------------------------------------- teacher: θ0 → θ1
  def teacher_loss(params, table_rows):
    out = apply(params, with_rows(inputs, 0, table_rows), k_teacher)
    num, den = losses.nll(out['logp'], y, valid)
    return num / _global(den, axis_name), out

  (loss_t, out_t), (g_t, g_rows_t) = jax.value_and_grad(teacher_loss, argnums=(0, 1),
                                                        has_aux=True)(
      params0, rows.p0 if rows else None)
  g_t = _global(g_t, axis_name)
  if rows:
    G_t = rows.sums(g_rows_t)
    g_t_used, gnorm_t, clip_t = optim.clip_by_global_norm(
        g_t, config.optim.grad_clip, extra_sq=jnp.sum(G_t * G_t), return_factor=True)
  else:
    g_t = optim.zero_padding_row(g_t)
    g_t_used, gnorm_t = optim.clip_by_global_norm(g_t, config.optim.grad_clip)
  params1, opt1 = optim.apply_update(tx, labels, params0, g_t_used, opt0, cfg=native_optim,
                                     skip=('student_only',), lead=lead,
                                     after=(G_t,) if rows else ())
  if rows:
    rows.first_update(G_t * clip_t)

  # ---------------------------------------------------------------- student: θ1 → θ2
  target = jax.lax.stop_gradient(
      {k: out_t[k] for k in ('joint_rep', 'attn_qk', 'text_hidden')})
  vmask = valid[:, None]
  dropped = {'text': (inputs['text_mask'] - text_keep) * vmask,
             'audio': (inputs['audio_mask'] - audio_keep) * vmask,
             'vision': (inputs['vision_mask'] - vision_keep) * vmask}

  def student_loss(params, table_rows):
    out = apply(params, with_rows(x_m, 1, table_rows), k_student, reconstruct=True)
    terms = {
        'loss_task_m': losses.nll(out['logp'], y, valid),
        'loss_rep': losses.representation(out['joint_rep'], target['joint_rep'], valid),
        'loss_attn': losses.attention_kl_qk(target['attn_qk'], out['attn_qk'], valid,
                                            model.kernels),
        'loss_rec_text': losses.reconstruction(out['text_recon'], target['text_hidden'],
                                               dropped['text']),
        'loss_rec_audio': losses.reconstruction(out['audio_recon'], inputs['audio'],
                                                dropped['audio']),
        'loss_rec_vision': losses.reconstruction(out['vision_recon'], inputs['vision'],
                                                 dropped['vision']),
    }
    vals = {}
    for k, (num, den) in terms.items():
      den = _global(den, axis_name)
      vals[k] = num / (den + 1e-6) if k.startswith('loss_rec') else num / den
    total = (vals['loss_task_m'] + cfg_loss.w_rep * vals['loss_rep']
             + cfg_loss.w_attn * vals['loss_attn']
             + cfg_loss.w_rec * (vals['loss_rec_text'] + vals['loss_rec_audio']
                                 + vals['loss_rec_vision']))
    return total, (vals, out)

  (loss_s, (vals, out_s)), (g_s, g_rows_s) = jax.value_and_grad(
      student_loss, argnums=(0, 1), has_aux=True)(params1, rows.p1 if rows else None)
  g_s = _global(g_s, axis_name)
  if not rows:
    g_s = optim.zero_padding_row(g_s)
  g2 = jax.tree.map(jnp.add, g_t, g_s) if cfg_train.accumulate_teacher_grad else g_s
  if rows:
    G_2 = rows.sums(g_rows_s)
    if cfg_train.accumulate_teacher_grad:
      G_2 = G_t + G_2
    g2_used, gnorm_2, clip_2 = optim.clip_by_global_norm(
        g2, config.optim.grad_clip, extra_sq=jnp.sum(G_2 * G_2), return_factor=True)
  else:
    g2_used, gnorm_2 = optim.clip_by_global_norm(g2, config.optim.grad_clip)
  out_cf = None
  if cfg_train.counterfactual_metrics:   # reads θ1: before the in-place update to θ2
    x_cf = with_rows(dict(x_m, text_ids=cf_ids), 2, rows.p1 if rows else None)
    out_cf = apply(params1, x_cf, k_cf)
  params2, opt2 = optim.apply_update(
      tx, labels, params1, g2_used, opt1, cfg=native_optim, lead=lead,
      after=((G_2,) if rows else ()) + ((out_cf['logp'],) if out_cf is not None else ()))

  metrics = {k: _global(v, axis_name) for k, v in vals.items()}
  metrics['loss_task'] = _global(loss_t, axis_name)
  metrics['loss'] = _global(loss_s, axis_name)
  metrics['grad_norm_teacher'] = gnorm_t
  metrics['grad_norm_student'] = gnorm_2
  n_valid = _global(jnp.sum(valid), axis_name)
  correct = (jnp.argmax(out_s['logp'], -1) == y) * valid
  metrics['acc_m'] = _global(jnp.sum(correct), axis_name) / n_valid
  if out_cf is not None:
    tau = config.maci.get('train_tau', 1.0)
    debiased = out_s['logp'] - tau * jax.lax.stop_gradient(out_cf['logp'])
    correct_d = (jnp.argmax(debiased, -1) == y) * valid
    metrics['acc_m_debiased'] = _global(jnp.sum(correct_d), axis_name) / n_valid
    metrics['logp_cf'] = out_cf['logp']
  if rows:
    params2, opt2 = rows.finish(params2, opt2, G_2 * clip_2)
    if return_grads:
      g_t, g2 = rows.dense_grads(g_t, G_t), rows.dense_grads(g2, G_2)
  new_state = state.replace(step=state.step + 1, params=params2, opt_state=opt2)
  if return_grads:
    metrics['grads'] = (g_t, g2)
  return new_state, metrics


def make_train_step(model, tx, labels, config, axis_name: Optional[str] = 'batch',
                    return_grads: bool = False):
  """pmapped (axis_name set) or jitted (axis_name None) step; the state buffers are donated."""
  fn = functools.partial(train_step, model=model, tx=tx, labels=labels, config=config,
                         axis_name=axis_name, return_grads=return_grads)
  if axis_name:
    return jax.pmap(fn, axis_name=axis_name, donate_argnums=(0,))
  return jax.jit(fn, donate_argnums=(0,))
