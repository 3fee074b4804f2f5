"""The original's torch Adam as an optax transform (REFERENCE §4).

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


def group_transforms(cfg):
  """{group label: its optax transform}; cfg: config.optim."""
  def adam(lr, wd=0.0):
    parts = [optax.add_decayed_weights(wd)] if wd else []
    return optax.chain(*parts, optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
                       optax.scale(-lr))
  return {
      'bert_decay': adam(cfg.bert_lr, cfg.bert_weight_decay),
      'bert_no_decay': adam(cfg.bert_lr),
      'rest': adam(cfg.lr),
      'student_only': adam(cfg.lr),
      'frozen': optax.set_to_zero(),
  }


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
