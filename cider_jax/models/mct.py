"""MCT: the multimodal composite transformer over [text | audio | vision] (T = 3L), docs/model.md
§2, step 5. The attention core and the pattern projections are in models/attention.py."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cider_jax.models import ops as ops_lib
from cider_jax.models.attention import SUMMARY

def sinusoids(num: int, dim: int) -> np.ndarray:
  """(num, dim) table: sin on even channels, cos on odd ones."""
  pos = np.arange(num, dtype=np.float32)[:, None]
  div = np.exp(np.arange(0, dim, 2, dtype=np.float32) * (-math.log(10000.0) / dim))
  pe = np.zeros((num, dim), np.float32)
  pe[:, 0::2] = np.sin(pos * div)
  pe[:, 1::2] = np.cos(pos * div[: dim // 2])
  return pe


def add_positions(x, mode: str):
  """x (B, T, E). 'time': position t at step t; 'reference': position b for batch item b."""
  B, T, E = x.shape
  if mode == 'time':
    return x + sinusoids(T, E)[None].astype(x.dtype)
  if mode == 'reference':
    if B > 1024:
      raise ValueError('positions="reference" supports batches of at most 1024 (its table size)')
    return x + sinusoids(B, E)[:, None, :].astype(x.dtype)
  raise ValueError(f'model.positions must be "time" or "reference", got {mode!r}')


class _DenseParams(nn.Module):
  """The kernel (in, out) and bias (out,) of an `nn.Dense` of the same name and initialisers."""
  in_features: int
  features: int

  @nn.compact
  def __call__(self):
    shape = (self.in_features, self.features)
    kernel = self.param('kernel', nn.initializers.lecun_normal(), shape)
    return kernel, self.param('bias', nn.initializers.zeros, (self.features,))


class CompositeAttention(nn.Module):
  embed_dim: int
  num_heads: int
  attn_dropout: float = 0.0
  ops: ops_lib.Ops = ops_lib.PLAIN

  @nn.compact
  def __call__(self, x, deterministic: bool):
    """x (B, T, E) → (out (B, T, E), {'scores': raw scaled scores (B, H, T, T),
    'qk': (scaled queries, keys), each (B, H, T, D)}), the scores' factors (XLA drops
    whichever the caller does not use)."""
    B, T, E = x.shape
    H = self.num_heads
    D = E // H
    L = T // 3
    xavier = nn.initializers.xavier_uniform()
    qkv = self.ops.dense(3 * E, kernel_init=xavier, name='qkv')(x)
    scale = np.float32(D ** -0.5)
    weights_fn = None
    if self.attn_dropout > 0 and not deterministic:
      weights_fn = lambda w: self.ops.dropout(self.attn_dropout)(w, deterministic=False)
    packed = self.ops.composite_attention(qkv, H, L, scale, weights_fn)   # (B, T, 4E)
    # only the last layer's scores are used (distillation); elsewhere XLA drops them
    q, k, _ = jnp.split(qkv, 3, axis=-1)
    heads = lambda t: jnp.transpose(t.reshape(B, T, H, D), (0, 2, 1, 3))
    q, k = heads(q * scale), heads(k)
    scores = jnp.einsum('bhqd,bhkd->bhqk', q, k)

    out_kernel = self.param('out_kernel', lambda k, s: jax.vmap(lambda kk: xavier(kk, s[1:]))(
        jax.random.split(k, s[0])), (7, E, E))
    out_bias = self.param('out_bias', nn.initializers.zeros, (7, E))
    final = _DenseParams(E, E, name='final_out')()
    outs = []
    for i, name in enumerate('lav'):
      idx = np.array(SUMMARY[name])
      summary = _DenseParams(4 * E, E, name=f'summary_{name}')()
      outs.append(self.ops.project_patterns(packed[:, i * L:(i + 1) * L], out_kernel[idx],
                                            out_bias[idx], *summary, *final))
    return jnp.concatenate(outs, axis=1), {'scores': scores, 'qk': (q, k)}


class MCTLayer(nn.Module):
  embed_dim: int
  num_heads: int
  attn_dropout: float = 0.0
  relu_dropout: float = 0.0
  res_dropout: float = 0.0
  ops: ops_lib.Ops = ops_lib.PLAIN

  @nn.compact
  def __call__(self, x, deterministic: bool):
    E = self.embed_dim
    xavier = nn.initializers.xavier_uniform()
    dropout = lambda rate, h: self.ops.dropout(rate)(h, deterministic=deterministic)
    h = self.ops.layer_norm(epsilon=1e-5, name='ln_attn')(x)
    h, attn = CompositeAttention(E, self.num_heads, self.attn_dropout, self.ops,
                                 name='attention')(h, deterministic)
    x = x + dropout(self.res_dropout, h)
    h = self.ops.layer_norm(epsilon=1e-5, name='ln_ffn')(x)
    h = jax.nn.relu(self.ops.dense(4 * E, kernel_init=xavier, name='fc1')(h))
    h = dropout(self.relu_dropout, h)
    h = self.ops.dense(E, kernel_init=xavier, name='fc2')(h)
    x = x + dropout(self.res_dropout, h)
    return x, attn


class MCT(nn.Module):
  """Positions + embedding dropout, `layers` pre-LN blocks, final LayerNorm."""
  embed_dim: int
  num_heads: int
  layers: int
  attn_dropout: float = 0.0
  relu_dropout: float = 0.0
  res_dropout: float = 0.0
  embed_dropout: float = 0.0
  positions: str = 'time'
  ops: ops_lib.Ops = ops_lib.PLAIN

  @nn.compact
  def __call__(self, x, deterministic: bool):
    """x (B, 3L, E) → (y (B, 3L, E), the last layer's attention dict (CompositeAttention))."""
    x = add_positions(x, self.positions)
    x = self.ops.dropout(self.embed_dropout)(x, deterministic=deterministic)
    attn = None
    for i in range(self.layers):
      x, attn = MCTLayer(self.embed_dim, self.num_heads, self.attn_dropout, self.relu_dropout,
                         self.res_dropout, self.ops, name=f'layer_{i}')(x, deterministic)
    return self.ops.layer_norm(epsilon=1e-5, name='ln_final')(x), attn
