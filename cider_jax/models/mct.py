"""MCT: the multimodal composite transformer over [text | audio | vision] (T = 3L).

The seven modality patterns (LAV, LA, LV, AV, L, A, V) are one (7, 3) membership table. A
query attending inside pattern P is a softmax over the union of P's key blocks, so the scores
are reduced once per key block (max, sum of exponentials, weighted values) and every pattern
is a log-sum-exp combination of its blocks: one attention's cost, no seven masked copies.
This equals the original's masked softmaxes (masked keys get weight exp(−1e9) = 0 there).
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# rows: patterns in the order of the original's out_proj indices; columns: key blocks L, A, V
PATTERNS = ('LAV', 'LA', 'LV', 'AV', 'L', 'A', 'V')
MEMBERSHIP = np.array([[m in p for m in 'LAV'] for p in PATTERNS], np.float32)  # (7, 3)
# the four patterns each modality's summary reads, in concatenation order
SUMMARY = {'l': (0, 1, 2, 4), 'a': (0, 1, 3, 5), 'v': (0, 2, 3, 6)}


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


def composite_attention_heads(scores, v, block_len, attn_weights_fn=None):
  """Per-pattern attention outputs.

  scores (B, H, T, T) scaled raw scores; v (B, T, H, D); T = 3·block_len.
  attn_weights_fn: optional f(weights (B,H,T,T)) applied to the LAV weights (dropout).
  Returns (B, T, 7, H, D): for every query, its attention output inside each pattern.
  """
  B, H, T, _ = scores.shape
  s = scores.reshape(B, H, T, 3, block_len)
  vb = v.reshape(B, 3, block_len, v.shape[2], v.shape[3])
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1))                      # (B, H, T, 3)
  e = jnp.exp(s - m[..., None])
  z = jnp.sum(e, axis=-1)                                               # (B, H, T, 3)
  n = jnp.einsum('bhqmk,bmkhd->bhqmd', e, vb)                          # (B, H, T, 3, D)
  member = jnp.asarray(MEMBERSHIP)                                      # (7, 3)
  m_p = jnp.max(jnp.where(member[None, None, None] > 0, m[:, :, :, None, :], -jnp.inf), axis=-1)
  scale = member * jnp.exp(m[:, :, :, None, :] - m_p[..., None])        # (B, H, T, 7, 3)
  z_p = jnp.einsum('bhqpm,bhqm->bhqp', scale, z)
  n_p = jnp.einsum('bhqpm,bhqmd->bhqpd', scale, n)
  out = n_p / z_p[..., None]                                            # (B, H, T, 7, D)
  if attn_weights_fn is not None:
    w = attn_weights_fn(jax.nn.softmax(scores, axis=-1))
    lav = jnp.einsum('bhqk,bkhd->bhqd', w, v)
    out = out.at[:, :, :, 0].set(lav)
  return jnp.transpose(out, (0, 2, 3, 1, 4))


class CompositeAttention(nn.Module):
  embed_dim: int
  num_heads: int
  attn_dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    """x (B, T, E) → (out (B, T, E), raw scaled scores (B, H, T, T))."""
    B, T, E = x.shape
    H = self.num_heads
    D = E // H
    L = T // 3
    xavier = nn.initializers.xavier_uniform()
    qkv = nn.Dense(3 * E, dtype=self.dtype, kernel_init=xavier, name='qkv')(x)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q = q * np.float32(D ** -0.5)
    heads = lambda t: t.reshape(B, T, H, D)
    scores = jnp.einsum('bqhd,bkhd->bhqk', heads(q), heads(k)).astype(jnp.float32)
    drop = None
    if self.attn_dropout > 0 and not deterministic:
      drop = lambda w: nn.Dropout(self.attn_dropout)(w, deterministic=False)
    per_pattern = composite_attention_heads(scores, heads(v).astype(jnp.float32), L, drop)
    per_pattern = per_pattern.reshape(B, T, 7, E).astype(self.dtype)
    out_kernel = self.param('out_kernel', lambda k, s: jax.vmap(lambda kk: xavier(kk, s[1:]))(
        jax.random.split(k, s[0])), (7, E, E))
    out_bias = self.param('out_bias', nn.initializers.zeros, (7, E))
    projected = {}
    for name, sl in (('l', slice(0, L)), ('a', slice(L, 2 * L)), ('v', slice(2 * L, 3 * L))):
      idx = np.array(SUMMARY[name])
      h = jnp.einsum('btpe,pef->btpf', per_pattern[:, sl][:, :, idx],
                     out_kernel[idx].astype(self.dtype)) + out_bias[idx].astype(self.dtype)
      h = h.reshape(B, L, 4 * E)
      projected[name] = nn.Dense(E, dtype=self.dtype, name=f'summary_{name}')(h)
    out = jnp.concatenate([projected['l'], projected['a'], projected['v']], axis=1)
    out = nn.Dense(E, dtype=self.dtype, name='final_out')(out)
    return out, scores


class MCTLayer(nn.Module):
  embed_dim: int
  num_heads: int
  attn_dropout: float = 0.0
  relu_dropout: float = 0.0
  res_dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    E = self.embed_dim
    xavier = nn.initializers.xavier_uniform()
    h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='ln_attn')(x)
    h, scores = CompositeAttention(E, self.num_heads, self.attn_dropout, self.dtype,
                                   name='attention')(h, deterministic)
    x = x + nn.Dropout(self.res_dropout)(h, deterministic=deterministic)
    h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='ln_ffn')(x)
    h = jax.nn.relu(nn.Dense(4 * E, dtype=self.dtype, kernel_init=xavier, name='fc1')(h))
    h = nn.Dropout(self.relu_dropout)(h, deterministic=deterministic)
    h = nn.Dense(E, dtype=self.dtype, kernel_init=xavier, name='fc2')(h)
    x = x + nn.Dropout(self.res_dropout)(h, deterministic=deterministic)
    return x, scores


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
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    """x (B, 3L, E) → (y (B, 3L, E), last layer's raw scores (B, H, 3L, 3L))."""
    x = add_positions(x, self.positions)
    x = nn.Dropout(self.embed_dropout)(x, deterministic=deterministic)
    scores = None
    for i in range(self.layers):
      x, scores = MCTLayer(self.embed_dim, self.num_heads, self.attn_dropout, self.relu_dropout,
                           self.res_dropout, self.dtype, name=f'layer_{i}')(x, deterministic)
    return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='ln_final')(x), scores
