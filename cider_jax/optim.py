"""The original's torch Adam as an optax transform (docs/model.md §4).

Groups (labels): `bert_decay` (text-encoder weights: lr 5e-5, L2 1e-3 added to the gradient),
`bert_no_decay` (text-encoder biases and LayerNorms: lr 5e-5), `rest` (lr 1e-3),
`student_only` (reconstruction decoders, lr 1e-3: outside the teacher loss, so the teacher
update leaves them, their moments and their step count untouched — see `keep_group`), and
`frozen` (WSAM on aligned data: in neither loss, never updated).
"""
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

STUDENT_ONLY = ('recon_text', 'recon_audio', 'recon_vision')


def param_labels(params, aligned: bool):
  """Pytree of group labels with the structure of `params`."""
  flat = traverse_util.flatten_dict(params)
  labels = {}
  for path in flat:
    top, leaf = path[0], path[-1]
    if top == 'text_encoder':
      no_decay = leaf in ('bias', 'scale') or 'LayerNorm' in path
      labels[path] = 'bert_no_decay' if no_decay else 'bert_decay'
    elif top in STUDENT_ONLY:
      labels[path] = 'student_only'
    elif aligned and top in ('wsam_a', 'wsam_v'):
      labels[path] = 'frozen'
    else:
      labels[path] = 'rest'
  return traverse_util.unflatten_dict(labels)


def adam_groups(cfg):
  """{group label: (learning rate, L2 coefficient)} of the Adam groups; cfg: config.optim."""
  return {'bert_decay': (cfg.bert_lr, cfg.bert_weight_decay),
          'bert_no_decay': (cfg.bert_lr, 0.0),
          'rest': (cfg.lr, 0.0),
          'student_only': (cfg.lr, 0.0)}


SCHEDULES = ('constant', 'linear_tail')


def lr_factor(cfg, total_steps: int):
  """The learning-rate schedule of config.optim: step → the factor (float32) every group's
  rate is multiplied by at that step. 'constant': 1 throughout (the original). 'linear_tail':
  1 until `decay_start` (a fraction of the run's `total_steps`), then down in a straight line
  to `final_factor` at the last step: the late epochs take smaller steps, so the checkpoints
  between which validation chooses move less from epoch to epoch (docs/quickstart.md)."""
  name = cfg.get('schedule', 'constant')
  if name not in SCHEDULES:
    raise ValueError(f'optim.schedule must be one of {SCHEDULES}, got {name!r}')
  if name == 'constant':
    return lambda step: jnp.ones((), jnp.float32)
  start = int(round(cfg.decay_start * total_steps))
  length = max(1, total_steps - 1 - start)
  final = cfg.final_factor
  def factor(step):
    done = jnp.clip((step - start) / length, 0.0, 1.0)
    return (1.0 - done * (1.0 - final)).astype(jnp.float32)
  return factor


def group_transforms(cfg):
  """{group label: its optax transform}; cfg: config.optim."""
  def adam(lr, wd):
    parts = [optax.add_decayed_weights(wd)] if wd else []
    return optax.chain(*parts, optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
                       optax.scale(-lr))
  groups = {label: adam(lr, wd) for label, (lr, wd) in adam_groups(cfg).items()}
  groups['frozen'] = optax.set_to_zero()
  return groups


def make_optimizer(cfg, params, aligned: bool):
  """cfg: config.optim. Returns (optax transform, labels pytree)."""
  labels = param_labels(params, aligned)
  return optax.multi_transform(group_transforms(cfg), labels), labels


def keep_group(group: str, labels, old_params, new_params, old_state, new_state):
  """Undo an update for one group: its parameters and its optimizer state stay as before."""
  params = jax.tree.map(lambda lab, o, n: o if lab == group else n, labels, old_params,
                        new_params)
  inner = dict(new_state.inner_states)
  inner[group] = old_state.inner_states[group]
  return params, new_state._replace(inner_states=inner)


def adam_state(chain):
  """(position, state) of the Adam state in a group's chain state."""
  for i, state in enumerate(chain):
    if isinstance(state, optax.ScaleByAdamState):
      return i, state
  raise ValueError('no Adam state in the optimizer group\'s chain')


def with_adam_state(opt_state, group: str, fn):
  """opt_state with group's Adam state replaced by fn(its ScaleByAdamState)."""
  masked = opt_state.inner_states[group]
  i, adam = adam_state(masked.inner_state)
  inner = list(masked.inner_state)
  inner[i] = fn(adam)
  states = dict(opt_state.inner_states)
  states[group] = masked._replace(inner_state=tuple(inner))
  return opt_state._replace(inner_states=states)


def group_adam_state(opt_state, group: str):
  """The ScaleByAdamState of one group of make_optimizer's state."""
  return adam_state(opt_state.inner_states[group].inner_state)[1]


def apply_update(tx, labels, params, grads, opt_state, *, cfg=None, skip=(), lead=False,
                 after=(), scale=1.0):
  """(params + scale · tx's update, new opt_state) for make_optimizer's transform `tx`; the
  groups in `skip` keep their parameters and state (keep_group). scale: the schedule's factor
  of the learning rates at this step (`lr_factor`; the update is −lr·Adam(g), so scaling it
  scales lr).

  cfg, lead, after: used by the in-place form with the same signature (kernels/adam.py),
  which models/ops.py can put in its place; ignored here.
  """
  del cfg, lead, after
  updates, new_state = tx.update(grads, opt_state, params)
  new_params = jax.tree.map(lambda p, u: p + scale * u, params, updates)
  for group in skip:
    new_params, new_state = keep_group(group, labels, params, new_params, opt_state, new_state)
  return new_params, new_state


def zero_padding_row(grads):
  """The word-embedding row of the padding id 0 never receives a gradient (torch padding_idx)."""
  emb = grads['text_encoder']['embeddings']['word_embeddings']['embedding']
  grads = jax.tree.map(lambda x: x, grads)  # shallow structural copy
  grads['text_encoder']['embeddings']['word_embeddings']['embedding'] = emb.at[0].set(0.0)
  return grads


def clip_by_global_norm(grads, max_norm: float, extra_sq=None, return_factor: bool = False):
  """Scale grads so that their global norm is at most max_norm (no-op when max_norm <= 0).

  extra_sq: the squared norm of gradients held outside the tree (embedding_rows), counted in
  the global norm; return_factor: also return the factor (1 when not clipping) to scale them.
  """
  if extra_sq is None:
    norm = optax.tree.norm(grads)
  else:
    norm = jnp.sqrt(optax.tree.norm(grads, squared=True) + extra_sq)
  factor = jnp.ones((), jnp.float32)
  if max_norm > 0:
    factor = jnp.minimum(1.0, max_norm / (norm + 1e-12))
    grads = jax.tree.map(lambda g: g * factor, grads)
  return (grads, norm, factor) if return_factor else (grads, norm)
