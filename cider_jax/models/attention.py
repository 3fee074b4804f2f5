"""Attention cores in plain JAX: the masked softmax attention of BERT and WSAM, and the
MCT's composite attention (docs/model.md §2, steps 1, 3 and 5).

These are the default implementations the modules are built with (models/ops.py); other
implementations with the same signatures (the native CPU kernels) are injected from
cider_jax/backend.py. The composite attention has two plain forms: one masked softmax per
modality pattern, as the model is described, and the block form, which reduces the scores
once per key block and combines the blocks per pattern (the same values, one attention's cost).
"""
import jax
import jax.numpy as jnp
import numpy as np

NEG = -1e9

# rows: patterns in the order of the original's out_proj indices; columns: key blocks L, A, V
PATTERNS = ('LAV', 'LA', 'LV', 'AV', 'L', 'A', 'V')
MEMBERSHIP = np.array([[m in p for m in 'LAV'] for p in PATTERNS], np.float32)  # (7, 3)
# the four patterns each modality's summary reads, in concatenation order
SUMMARY = {'l': (0, 1, 2, 4), 'a': (0, 1, 3, 5), 'v': (0, 2, 3, 6)}


def masked_attention(q, k, v, key_bias, *, scale, dropout=None, rows=None, cols=None):
  """Softmax attention over keys with an additive key bias.

  q (B, T, H, D), k, v (B, S, H, D), key_bias (B, S) → (B, T, H, D).
  scale: the factor of q·k; dropout: a dropout module applied to the weights (None: none);
  rows (B, T) / cols (B, S) 0/1: the query rows that attend and the keys they may see (a key
  outside cols gets NEG added; weights are multiplied by rows ⊗ cols, so a row outside rows,
  or a row without a key, outputs 0).
  """
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) * np.float32(scale)
  scores = scores.astype(jnp.float32) + key_bias[:, None, None, :]
  if cols is not None:
    scores = jnp.where(cols[:, None, None, :] > 0, scores, scores + NEG)
  weights = jax.nn.softmax(scores, axis=-1)
  if rows is not None or cols is not None:
    r = jnp.ones(q.shape[:2], jnp.float32) if rows is None else rows
    c = jnp.ones(k.shape[:2], jnp.float32) if cols is None else cols
    weights = weights * (r[:, None, :, None] * c[:, None, None, :])
  if dropout is not None:
    weights = dropout(weights, deterministic=False)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


def _heads(t, heads):
  """(B, T, H·D) → (B, H, T, D)."""
  B, T, E = t.shape
  return jnp.transpose(t.reshape(B, T, heads, E // heads), (0, 2, 1, 3))


def _packed(per_block):
  """{'l'|'a'|'v': (B, H, L, 4, D)} → (B, 3L, 4E): per position its block's four pattern
  outputs, heads and dims within each."""
  outs = []
  for name in 'lav':
    o = per_block[name]
    B, H, L, P, D = o.shape
    outs.append(jnp.transpose(o, (0, 2, 3, 1, 4)).reshape(B, L, P * H * D))
  return jnp.concatenate(outs, axis=1)


def composite_attention(qkv, heads: int, block_len: int, scale: float, weights_fn=None):
  """The MCT's composite attention, one masked softmax per modality pattern.

  qkv (B, T, 3E) = [q | k | v] projections, T = 3·block_len (text, audio, vision blocks).
  For pattern P, a query attends to the keys of P's blocks only (the others get NEG).
  weights_fn: optional f(weights (B, H, T, T)) applied to the LAV weights (attention dropout).
  Returns (B, T, 4E): for a position of block m, the outputs of the four patterns of
  SUMMARY[m] in order, each (H, D) flattened.
  """
  q, k, v = (_heads(t.astype(jnp.float32), heads) for t in jnp.split(qkv, 3, axis=-1))
  scores = jnp.einsum('bhqd,bhkd->bhqk', q * np.float32(scale), k)
  block = np.repeat(np.arange(3), block_len)                       # (T,) block of a position
  outputs = []
  for p in range(len(PATTERNS)):
    inside = MEMBERSHIP[p][block] > 0                              # (T,)
    allowed = inside[:, None] & inside[None, :]                    # (T, T)
    weights = jax.nn.softmax(jnp.where(allowed, scores, scores + NEG), axis=-1)
    if p == 0 and weights_fn is not None:
      weights = weights_fn(weights)
    outputs.append(jnp.einsum('bhqk,bhkd->bhqd', weights, v))
  per_block = {}
  for i, name in enumerate('lav'):
    rows = slice(i * block_len, (i + 1) * block_len)
    per_block[name] = jnp.stack([outputs[p][:, :, rows] for p in SUMMARY[name]], axis=3)
  return _packed(per_block)


# ------------------------------------------------------------------ the block form
def _outer(a, b):
  """(B, H, Q, D), (B, H, K, D) → (B, H, Q, K): Σ_d a·b as D elementwise products, which XLA
  fuses into the reduction or exponential that consumes it (the product is never stored)."""
  out = a[:, :, :, None, 0] * b[:, :, None, :, 0]
  for d in range(1, a.shape[-1]):
    out = out + a[:, :, :, None, d] * b[:, :, None, :, d]
  return out


@jax.custom_vjp
def key_block(q, k, v):
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
  m, z, n = key_block(q, k, v)
  return (m, z, n), (q, k, v, m)


def _key_block_bwd(res, cotangents):
  """Recomputes exp(s − m) instead of storing it: one fused pass writes dS."""
  q, k, v, m = res
  _, dz, dn = cotangents
  e = jnp.exp(_outer(q, k) - m[..., None])
  ds = e * (_outer(dn, v) + dz[..., None])
  return (jnp.einsum('bhqk,bhkd->bhqd', ds, k), jnp.einsum('bhqk,bhqd->bhkd', ds, q),
          jnp.einsum('bhqk,bhqd->bhkd', e, dn))


key_block.defvjp(_key_block_fwd, _key_block_bwd)


def block_stats(q, k, v, block_len):
  """q (B, H, T, D) scaled, k, v (B, H, T, D) → m, z (3, B, H, T), n (3, B, H, T, D): the
  statistics of `key_block` for the key blocks L, A, V."""
  stats = [key_block(q, k[:, :, j * block_len:(j + 1) * block_len],
                     v[:, :, j * block_len:(j + 1) * block_len]) for j in range(3)]
  return tuple(jnp.stack(t) for t in zip(*stats))


def _pattern_output(pattern: int, m, z, n):
  """Softmax over the union of the pattern's key blocks, from the block statistics:
  Σ_j c_j n_j / Σ_j c_j z_j with c_j = exp(m_j − max_j m_j)."""
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


def composite_attention_blockwise(qkv, heads: int, block_len: int, scale: float,
                                  weights_fn=None, stats_fn=block_stats):
  """`composite_attention` from per-key-block softmax statistics (same arguments, same
  values). stats_fn(q, k, v, block_len) → (m, z, n) as `block_stats` (the native kernel has
  the same signature)."""
  q, k, v = (_heads(t.astype(jnp.float32), heads) for t in jnp.split(qkv, 3, axis=-1))
  q = q * np.float32(scale)
  m, z, n = stats_fn(q, k, v, block_len)
  m = jax.lax.stop_gradient(m)
  lav = None
  if weights_fn is not None:
    w = weights_fn(jax.nn.softmax(jnp.einsum('bhqd,bhkd->bhqk', q, k), axis=-1))
    lav = jnp.einsum('bhqk,bhkd->bhqd', w, v)
  per_block = {}
  for i, name in enumerate('lav'):
    rows = slice(i * block_len, (i + 1) * block_len)
    mb, zb, nb = m[:, :, :, rows], z[:, :, :, rows], n[:, :, :, rows]
    outs = [lav[:, :, rows] if (p == 0 and lav is not None) else _pattern_output(p, mb, zb, nb)
            for p in SUMMARY[name]]
    per_block[name] = jnp.stack(outs, axis=3)
  return _packed(per_block)


# ------------------------------------------------------------------ pattern projections
def project_patterns(o, out_kernel, out_bias, summary_kernel, summary_bias, final_kernel,
                     final_bias):
  """One modality block's output: final(summary(concat_p(o_p W_p + b_p))).

  o (B, L, 4E): the block's four pattern outputs (packed as `composite_attention` returns
  them); out_kernel (4, E, E), out_bias (4, E): those patterns' output projections;
  summary (4E, E), final (E, E) linears. → (B, L, E).
  """
  B, L, _ = o.shape
  P, E, _ = out_kernel.shape
  per_pattern = jnp.einsum('blpe,pef->blpf', o.reshape(B, L, P, E), out_kernel) + out_bias
  summary = per_pattern.reshape(B, L, P * E) @ summary_kernel + summary_bias
  return summary @ final_kernel + final_bias


def project_patterns_folded(o, out_kernel, out_bias, summary_kernel, summary_bias,
                            final_kernel, final_bias, linear=None):
  """`project_patterns` as one contraction: Σ_p o_p (W_p S_p F) + ((Σ_p b_p S_p + b_S) F + b_F),
  the three linears folded into one (4E, E) matrix first. linear(x, w, b): the product
  x·w + b (default: XLA's)."""
  P, E, _ = out_kernel.shape
  s_kernel = summary_kernel.reshape(P, E, -1)
  w = jnp.einsum('pef,pfg,gh->peh', out_kernel, s_kernel, final_kernel).reshape(P * E, -1)
  b = (jnp.einsum('pf,pfg->g', out_bias, s_kernel) + summary_bias) @ final_kernel + final_bias
  if linear is None:
    return o @ w + b
  return linear(o, w, b)
