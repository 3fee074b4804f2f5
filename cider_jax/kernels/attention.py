"""Native CPU kernels (kernels.cc) for the MCT's composite attention and its distillation.

- `block_stats(q, k, v, block_len)`: for every query and every key block j, the row max m_j,
  the sum of exponentials z_j and the weighted values n_j (mct._key_block is the XLA form of
  the same function).
- `attention_kl(q_t, k_t, q_s, k_s)`: per query row, KL(softmax(q_t k_tᵀ) ‖ softmax(q_s k_sᵀ)),
  differentiated on the student side only (losses.attention_kl is the XLA form, given the
  scores).
- `masked_attention(q, k, v, bias, seed, ...)`: softmax attention with an additive key bias
  and optional hashed dropout of the weights, on the (batch, length, heads, head size) layout
  of the projections (BERT self-attention, WSAM); optional row and key selections skip the
  work of query rows whose output is not used and of padded keys.
- `composite_attention(qkv, heads, block_len, scale)`: the MCT's per-pattern attention
  outputs straight from its packed q|k|v projections, on `block_stats`' statistics
  (mct.composite_attention_heads is the XLA form).

The scores are recomputed in each pass, never stored: one pass forward and one backward for
the first two, one forward and two backward (queries, then keys in the vector lanes) for the
third.

Built and loaded by cider_jax.kernels.library; model.kernels chooses them.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cider_jax.kernels.library import f32 as _f32

HEAD_SIZES = (1, 2, 4, 8, 16, 24, 32, 64)


def supports(head_size: int) -> bool:
  return head_size in HEAD_SIZES


def _flat(t):
  return t.reshape((-1,) + t.shape[-2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def block_stats(q, k, v, block_len: int):
  """q (..., T, D) scaled queries, k, v (..., S, D), S = blocks·block_len, float32.

  Returns m, z (blocks, ..., T) and n (blocks, ..., T, D). m is a shift only: its cotangent
  is ignored (callers stop its gradient; every use is a ratio of n and z).
  """
  return _forward(q, k, v, block_len)


def _forward(q, k, v, block_len):
  lead, (T, D) = q.shape[:-2], q.shape[-2:]
  blocks = k.shape[-2] // block_len
  items = int(np.prod(lead, dtype=np.int64))
  m, z, n = jax.ffi.ffi_call(
      'cider_block_softmax_forward',
      (_f32((blocks, items, T)), _f32((blocks, items, T)), _f32((blocks, items, T, D))))(
          _flat(q), _flat(k), _flat(v), block_len=np.int64(block_len))
  return (m.reshape((blocks,) + lead + (T,)), z.reshape((blocks,) + lead + (T,)),
          n.reshape((blocks,) + lead + (T, D)))


def _block_stats_fwd(q, k, v, block_len):
  m, z, n = _forward(q, k, v, block_len)
  return (m, z, n), (q, k, v, m)


def _block_stats_bwd(block_len, res, cotangents):
  q, k, v, m = res
  _, dz, dn = cotangents
  blocks, T, D = m.shape[0], q.shape[-2], q.shape[-1]
  dq, dk, dv = jax.ffi.ffi_call(
      'cider_block_softmax_backward',
      (_f32(_flat(q).shape), _f32(_flat(k).shape), _f32(_flat(v).shape)))(
          _flat(q), _flat(k), _flat(v), m.reshape(blocks, -1, T), dz.reshape(blocks, -1, T),
          dn.reshape(blocks, -1, T, D), block_len=np.int64(block_len))
  return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


block_stats.defvjp(_block_stats_fwd, _block_stats_bwd)


@jax.custom_vjp
def attention_kl(q_t, k_t, q_s, k_s):
  """q_* (..., T, D), k_* (..., S, D): teacher (t) and student (s) queries (scaled) and keys.

  Returns (..., T): Σ_k p_t log(p_t / p_s) per query, p = softmax over the S keys of q·kᵀ.
  The teacher side is a constant: its cotangents are zero (the distillation target).
  """
  return _kl_forward(q_t, k_t, q_s, k_s)[0]


def _kl_forward(q_t, k_t, q_s, k_s):
  lead, T = q_t.shape[:-2], q_t.shape[-2]
  items = int(np.prod(lead, dtype=np.int64))
  kl, lse_t, lse_s = jax.ffi.ffi_call(
      'cider_attention_kl_forward', (_f32((items, T)),) * 3)(
          _flat(q_t), _flat(k_t), _flat(q_s), _flat(k_s))
  return kl.reshape(lead + (T,)), (q_t, k_t, q_s, k_s, lse_t, lse_s)


def _attention_kl_bwd(res, dkl):
  q_t, k_t, q_s, k_s, lse_t, lse_s = res
  dq, dk = jax.ffi.ffi_call(
      'cider_attention_kl_backward', (_f32(_flat(q_s).shape), _f32(_flat(k_s).shape)))(
          _flat(q_t), _flat(k_t), _flat(q_s), _flat(k_s), lse_t, lse_s,
          dkl.reshape(lse_t.shape))
  return (jnp.zeros_like(q_t), jnp.zeros_like(k_t), dq.reshape(q_s.shape), dk.reshape(k_s.shape))


attention_kl.defvjp(_kl_forward, _attention_kl_bwd)


def masked_attention(q, k, v, bias, seed, scale: float, threshold: int, keep_prob: float,
                     rows=None, cols=None):
  """q (G, T, H, D), k, v (G, S, H, D), bias (G, S) additive, seed uint32 (2,): → (G, T, H, D).

  out[g, t, h] = Σ_s p_ts · keep_ts / keep_prob · v[g, s, h], p = softmax_s(scale·q·k + bias),
  keep_ts = hashed dropout bits (models.dropout.hashed_bits of `seed`, flat index over the
  (G, H, T, S) weights) >= threshold; threshold 0: no dropout. Differentiable in q, k, v (the
  bias, the seed and the selections are constants). float32.

  rows (G, T) / cols (G, S), 0/1 (default all 1): the work to do. A row with rows = 0 is not
  computed: its output is 0 and its gradient ignored. A key with cols = 0 is left out of
  the softmax (as a bias of −inf would); a row with no key left outputs 0.
  """
  G, T, _, _ = q.shape
  S = k.shape[1]
  rows = jnp.ones((G, T), jnp.float32) if rows is None else rows.astype(jnp.float32)
  cols = jnp.ones((G, S), jnp.float32) if cols is None else cols.astype(jnp.float32)
  return _masked(q, k, v, bias, rows, cols, seed, scale, threshold, keep_prob)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _masked(q, k, v, bias, rows, cols, seed, scale, threshold, keep_prob):
  return _masked_forward(q, k, v, bias, rows, cols, seed, scale, threshold, keep_prob)[0]


def _masked_call(target, results, args, scale, threshold, keep_prob):
  return jax.ffi.ffi_call(target, results)(
      *args, scale=np.float32(scale), threshold=np.int64(threshold),
      keep_prob=np.float32(keep_prob))


def _masked_forward(q, k, v, bias, rows, cols, seed, scale, threshold, keep_prob):
  G, T, H, _ = q.shape
  seed = seed.astype(jnp.uint32)
  out, m, z = _masked_call('cider_masked_attention_forward',
                           (_f32(q.shape), _f32((G, H, T)), _f32((G, H, T))),
                           (q, k, v, bias, rows, cols, seed), scale, threshold, keep_prob)
  return out, (q, k, v, bias, rows, cols, seed, m, z, out)


def _masked_bwd(scale, threshold, keep_prob, res, dout):
  q, k, v, bias, rows, cols, seed, m, z, out = res
  dq, dk, dv = _masked_call('cider_masked_attention_backward',
                            (_f32(q.shape), _f32(k.shape), _f32(v.shape)),
                            (q, k, v, bias, rows, cols, seed, m, z, out, dout), scale, threshold,
                            keep_prob)
  return (dq, dk, dv, jnp.zeros_like(bias), jnp.zeros_like(rows), jnp.zeros_like(cols), None)


_masked.defvjp(_masked_forward, _masked_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def composite_attention(qkv, heads: int, block_len: int, scale: float):
  """qkv (B, T, 3E) = [q | k | v] projections, T = 3·block_len, E = heads·D → (B, T, 4E).

  For a query of modality block i (t // block_len) and the p-th of that block's four
  patterns (mct.SUMMARY), out[b, t, p·E + h·D : p·E + (h+1)·D] is head h's softmax attention
  of scale·q over the keys of the pattern's blocks (mct.MEMBERSHIP). float32.
  """
  return _composite_forward(qkv, heads, block_len, scale)[0]


def _composite_attrs(heads, block_len, scale):
  return dict(heads=np.int64(heads), block_len=np.int64(block_len), scale=np.float32(scale))


def _composite_forward(qkv, heads, block_len, scale):
  B, T, E3 = qkv.shape
  out, mz = jax.ffi.ffi_call(
      'cider_composite_attention_forward',
      (_f32((B, T, 4 * (E3 // 3))), _f32((B * heads, 2, 3, T))))(
          qkv, **_composite_attrs(heads, block_len, scale))
  return out, (qkv, mz, out)


def _composite_bwd(heads, block_len, scale, res, dout):
  qkv, mz, out = res
  dqkv = jax.ffi.ffi_call('cider_composite_attention_backward', _f32(qkv.shape))(
      qkv, mz, out, dout, **_composite_attrs(heads, block_len, scale))
  return (dqkv,)


composite_attention.defvjp(_composite_forward, _composite_bwd)
