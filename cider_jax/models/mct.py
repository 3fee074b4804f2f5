"""MCT: the multimodal composite transformer over [text | audio | vision] (T = 3L).

The seven modality patterns (LAV, LA, LV, AV, L, A, V) are one (7, 3) membership table. A
query attending inside pattern P is a softmax over the union of P's key blocks, so the scores
are reduced once per key block (max, sum of exponentials, weighted values) and every pattern
is a log-sum-exp combination of its blocks: one attention's cost, no seven masked copies.
This equals the original's masked softmaxes (masked keys get weight exp(−1e9) = 0 there).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cider_jax.kernels import attention as native_attention
from cider_jax.kernels import dense as native_dense
from cider_jax.kernels import norm as native_norm
from cider_jax.models.dropout import Dropout

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


def _outer(a, b):
  """(B, H, Q, D), (B, H, K, D) → (B, H, Q, K): Σ_d a·b as D elementwise products.

  With D = E / heads = 4 a matmul would only write its output; written elementwise, XLA
  fuses it into the reduction or exponential that consumes it, so the (Q × K) product is
  never stored.
  """
  out = a[:, :, :, None, 0] * b[:, :, None, :, 0]
  for d in range(1, a.shape[-1]):
    out = out + a[:, :, :, None, d] * b[:, :, None, :, d]
  return out


@jax.custom_vjp
def _key_block(q, k, v):
  """Softmax statistics of every query over one key block (float32).

  q (B, H, T, D) scaled queries; k, v (B, H, Lb, D). Returns the row max m (B, H, T), the
  sum of exponentials z = Σ_k exp(s − m) (B, H, T) and the weighted values
  n = Σ_k exp(s − m) v (B, H, T, D), where s = q·kᵀ. m is a shift only: callers stop its
  gradient (every use is a ratio of n and z, which does not depend on it).
  """
  m = jnp.max(_outer(q, k), axis=-1)
  e = jnp.exp(_outer(q, k) - m[..., None])
  return m, jnp.sum(e, axis=-1), jnp.einsum('bhqk,bhkd->bhqd', e, v)


def _key_block_fwd(q, k, v):
  m, z, n = _key_block(q, k, v)
  return (m, z, n), (q, k, v, m)


def _key_block_bwd(res, cotangents):
  """Recomputes exp(s − m) instead of storing it: one fused pass writes dS."""
  q, k, v, m = res
  _, dz, dn = cotangents
  e = jnp.exp(_outer(q, k) - m[..., None])
  ds = e * (_outer(dn, v) + dz[..., None])
  return (jnp.einsum('bhqk,bhkd->bhqd', ds, k), jnp.einsum('bhqk,bhqd->bhkd', ds, q),
          jnp.einsum('bhqk,bhqd->bhkd', e, dn))


_key_block.defvjp(_key_block_fwd, _key_block_bwd)


def _block_stats(q, k, v, block_len, kernel='xla'):
  """Lists over the key blocks L, A, V of m_j, z_j (B, H, T) and n_j (B, H, T, D).

  kernel 'xla': the jnp form above; 'native': the same statistics from one CPU kernel call
  (cider_jax.kernels.attention.block_stats), forward and backward.
  """
  if kernel == 'native':
    m, z, n = native_attention.block_stats(q, k, v, block_len)
    m = jax.lax.stop_gradient(m)
    return [m[j] for j in range(3)], [z[j] for j in range(3)], [n[j] for j in range(3)]
  if kernel != 'xla':
    raise ValueError(f"attention kernel must be 'xla' or 'native', got {kernel!r}")
  stats = []
  for j in range(3):
    keys = slice(j * block_len, (j + 1) * block_len)
    m, z, n = _key_block(q, k[:, :, keys], v[:, :, keys])
    stats.append((jax.lax.stop_gradient(m), z, n))
  return [list(t) for t in zip(*stats)]


def _pattern_output(pattern: int, m, z, n):
  """Attention output of every query inside one pattern, from the block statistics.

  softmax over the union of the pattern's key blocks = Σ_j c_j n_j / Σ_j c_j z_j with
  c_j = exp(m_j − max_j m_j); elementwise on (B, H, rows, D), so XLA fuses it.
  """
  members = [j for j in range(3) if MEMBERSHIP[pattern, j]]
  top = m[members[0]]
  for j in members[1:]:
    top = jnp.maximum(top, m[j])
  num = den = 0.0
  for j in members:
    c = jnp.exp(m[j] - top)
    num = num + c[..., None] * n[j]
    den = den + c * z[j]
  return num / den[..., None]


def composite_attention_heads(q, k, v, block_len, attn_weights_fn=None, kernel='xla'):
  """Per-pattern attention outputs of the queries of each modality block.

  q, k, v (B, H, T, D), q already scaled; T = 3·block_len.
  attn_weights_fn: optional f(weights (B, H, T, T)) applied to the LAV weights (dropout).
  kernel: how the block statistics are computed ('xla' or 'native', see _block_stats).
  Returns {'l'|'a'|'v': (B, H, block_len, 4, D)}, the patterns of SUMMARY in order.
  """
  q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
  m, z, n = _block_stats(q, k, v, block_len, kernel)
  lav = None
  if attn_weights_fn is not None:
    w = attn_weights_fn(jax.nn.softmax(jnp.einsum('bhqd,bhkd->bhqk', q, k), axis=-1))
    lav = jnp.einsum('bhqk,bhkd->bhqd', w, v)
  per_block = {}
  for i, name in enumerate('lav'):
    rows = slice(i * block_len, (i + 1) * block_len)
    mb, zb, nb = [t[:, :, rows] for t in m], [t[:, :, rows] for t in z], [t[:, :, rows] for t in n]
    outs = []
    for p in SUMMARY[name]:
      if p == 0 and lav is not None:
        outs.append(lav[:, :, rows])
      else:
        outs.append(_pattern_output(p, mb, zb, nb))
    per_block[name] = jnp.stack(outs, axis=3)
  return per_block


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
  kernel: str = 'xla'

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
    qkv = native_dense.make(self.kernel, 3 * E, kernel_init=xavier, name='qkv')(x)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    scale = np.float32(D ** -0.5)
    heads = lambda t: jnp.transpose(t.reshape(B, T, H, D), (0, 2, 1, 3))
    drop = None
    if self.attn_dropout > 0 and not deterministic:
      drop = lambda w: Dropout(self.attn_dropout)(w, deterministic=False)
    q, k = heads(q * scale), heads(k)
    # only the last layer's scores are used (distillation); elsewhere XLA drops them
    scores = jnp.einsum('bhqd,bhkd->bhqk', q, k)
    if self.kernel == 'native' and drop is None:
      # (B, T, 4E), per query its block's four patterns × heads × D, from the packed qkv
      packed = native_attention.composite_attention(qkv.astype(jnp.float32), H, L, scale)
      per_block = {name: packed[:, i * L:(i + 1) * L] for i, name in enumerate('lav')}
    else:
      per_block = composite_attention_heads(q, k, heads(v), L, drop, self.kernel)
      # (B, H, L, 4, D) → (B, L, 4E), the packed layout
      per_block = {name: jnp.transpose(o, (0, 2, 3, 1, 4)).reshape(B, L, 4 * E)
                   for name, o in per_block.items()}
    out_kernel = self.param('out_kernel', lambda k, s: jax.vmap(lambda kk: xavier(kk, s[1:]))(
        jax.random.split(k, s[0])), (7, E, E))
    out_bias = self.param('out_bias', nn.initializers.zeros, (7, E))
    final_kernel, final_bias = _DenseParams(E, E, name='final_out')()
    projected = []
    for name in 'lav':
      idx = np.array(SUMMARY[name])
      # final(summary(concat_p(o_p W_p + b_p))) = Σ_p o_p (W_p S_p F) + ((Σ_p b_p S_p + b_S) F
      # + b_F): the pattern projections, the summary and the final linear are one contraction
      # over (pattern, head, dim) per modality block
      s_kernel, s_bias = _DenseParams(4 * E, E, name=f'summary_{name}')()
      s_kernel = s_kernel.reshape(4, E, E)
      w = jnp.einsum('pef,pfg,gh->peh', out_kernel[idx], s_kernel, final_kernel)  # (4, E, E)
      b = (jnp.einsum('pf,pfg->g', out_bias[idx], s_kernel) + s_bias) @ final_kernel + final_bias
      if self.kernel == 'native':
        projected.append(native_dense.dense(per_block[name], w.reshape(4 * E, E), b))
      else:
        projected.append(per_block[name] @ w.reshape(4 * E, E) + b)
    return jnp.concatenate(projected, axis=1), {'scores': scores, 'qk': (q, k)}


def layer_norm(kernel: str, name: str) -> nn.Module:
  """The MCT's LayerNorm (eps 1e-5, parameters scale and bias): the native kernel or XLA's."""
  if kernel == 'native':
    return native_norm.LayerNorm(1e-5, name=name)
  return nn.LayerNorm(epsilon=1e-5, name=name)


class MCTLayer(nn.Module):
  embed_dim: int
  num_heads: int
  attn_dropout: float = 0.0
  relu_dropout: float = 0.0
  res_dropout: float = 0.0
  kernel: str = 'xla'

  @nn.compact
  def __call__(self, x, deterministic: bool):
    E = self.embed_dim
    xavier = nn.initializers.xavier_uniform()
    h = layer_norm(self.kernel, 'ln_attn')(x)
    h, attn = CompositeAttention(E, self.num_heads, self.attn_dropout, self.kernel,
                                 name='attention')(h, deterministic)
    x = x + Dropout(self.res_dropout)(h, deterministic=deterministic)
    h = layer_norm(self.kernel, 'ln_ffn')(x)
    h = jax.nn.relu(native_dense.make(self.kernel, 4 * E, kernel_init=xavier, name='fc1')(h))
    h = Dropout(self.relu_dropout)(h, deterministic=deterministic)
    h = native_dense.make(self.kernel, E, kernel_init=xavier, name='fc2')(h)
    x = x + Dropout(self.res_dropout)(h, deterministic=deterministic)
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
  kernel: str = 'xla'             # 'native': composite attention and LayerNorm kernels

  @nn.compact
  def __call__(self, x, deterministic: bool):
    """x (B, 3L, E) → (y (B, 3L, E), the last layer's attention dict (CompositeAttention))."""
    x = add_positions(x, self.positions)
    x = Dropout(self.embed_dropout)(x, deterministic=deterministic)
    attn = None
    for i in range(self.layers):
      x, attn = MCTLayer(self.embed_dim, self.num_heads, self.attn_dropout, self.relu_dropout,
                           self.res_dropout, self.kernel, name=f'layer_{i}')(x, deterministic)
    return layer_norm(self.kernel, 'ln_final')(x), attn
