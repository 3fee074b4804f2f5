"""Pooling, joint representation and the MCM causal classifier (docs/model.md §2, steps 6–8)."""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cider_jax.models import ops as ops_lib


class AttentionPool(nn.Module):
  """Linear(E, E) → tanh → Linear(E, 1) scores, softmax over time (no padding mask), sum."""

  @nn.compact
  def __call__(self, h):
    """h (B, L, E) → (B, E)."""
    E = h.shape[-1]
    s = nn.Dense(1, name='score')(jnp.tanh(nn.Dense(E, name='hidden')(h)))
    w = jax.nn.softmax(s, axis=1)
    return jnp.sum(w * h, axis=1)


class JointRep(nn.Module):
  """z = x + Linear(dropout(relu(Linear(x))))."""
  out_dropout: float = 0.0
  ops: ops_lib.Ops = ops_lib.PLAIN

  @nn.compact
  def __call__(self, x, deterministic: bool):
    D = x.shape[-1]
    h = jax.nn.relu(nn.Dense(D, name='proj1')(x))
    h = self.ops.dropout(self.out_dropout)(h, deterministic=deterministic)
    return x + nn.Dense(D, name='proj2')(h)


class PrototypeEncoder(nn.Module):
  """D → E → E → E MLP with ReLUs; `layer_norm` adds parameter-free LayerNorms (cross-dataset)."""
  embed_dim: int
  layer_norm: bool = False

  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = nn.Dense(self.embed_dim, name=f'dense_{i}')(x)
      if i < 2:
        if self.layer_norm:
          x = nn.LayerNorm(epsilon=1e-5, use_scale=False, use_bias=False)(x)
        x = jax.nn.relu(x)
    return x


class MCM(nn.Module):
  """Causal classifier: Σ_i softmax(classifier_i([z, p_l^i, p_a^i, p_v^i])) · prior_i, then log."""
  num_classes: int
  embed_dim: int
  feature_dims: Sequence[int]   # (Dl, Da, Dv)
  cross_dataset: bool = False

  @nn.compact
  def __call__(self, z, cls_feats, cls_probs):
    """z (B, 3E); cls_feats (C, B, Dl+Da+Dv); cls_probs (B, C) → log-probs (B, C)."""
    C = self.num_classes
    Dl, Da, _ = self.feature_dims
    parts = (cls_feats[..., :Dl], cls_feats[..., Dl:Dl + Da], cls_feats[..., Dl + Da:])
    protos = [PrototypeEncoder(self.embed_dim, self.cross_dataset and m != 'l',
                               name=f'encoder_{m}')(p) for m, p in zip('lav', parts)]
    zc = jnp.broadcast_to(z[None], (C,) + z.shape)
    joint = jnp.concatenate([zc] + protos, -1)
    F = joint.shape[-1]
    kernel = self.param('classifier_kernel', nn.initializers.lecun_normal(batch_axis=(0,)),
                        (C, F, C))
    bias = self.param('classifier_bias', nn.initializers.zeros, (C, C))
    logits = jnp.einsum('cbf,cfk->cbk', joint, kernel) + bias[:, None, :]
    probs = jax.nn.softmax(logits, axis=-1)       # (C, B, C)
    mixed = jnp.einsum('cbk,bc->bk', probs, cls_probs)
    return jnp.log(mixed)
