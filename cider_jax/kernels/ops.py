"""The model's implementations (models/ops.py) as native CPU kernels, where they have one.

Each function has the signature of the plain form it replaces and computes the same values;
an attention whose head size the kernels lack falls back to the plain form.
"""
import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from cider_jax.kernels import adam as native_adam
from cider_jax.kernels import attention as native_attention
from cider_jax.kernels import dense as native_dense
from cider_jax.kernels import gru as native_gru
from cider_jax.kernels import norm as native_norm
from cider_jax.models import attention, matmul
from cider_jax.models import dropout as dropout_lib
from cider_jax.models import ops as ops_lib


def dense(features: int, dtype=jnp.float32, **kwargs):
  """float32: `kernels.dense.Dense` (the weight gradient by the kernel); other dtypes: the
  plain mixed-precision form."""
  if jnp.dtype(dtype) == jnp.float32:
    return native_dense.Dense(features, **kwargs)
  return matmul.Dense(features, dtype, **kwargs)


def masked_attention(q, k, v, key_bias, *, scale, dropout=None, rows=None, cols=None):
  """attention.masked_attention in one kernel call; the dropout module must be the hashed
  one (models/dropout.py), whose bits the kernel draws itself."""
  if not native_attention.supports(q.shape[-1]):
    return attention.masked_attention(q, k, v, key_bias, scale=scale, dropout=dropout,
                                      rows=rows, cols=cols)
  seed, threshold, keep_prob = jnp.zeros((2,), jnp.uint32), 0, 1.0
  if dropout is not None:
    seed, threshold = dropout.seed(), dropout_lib.threshold(dropout.rate)
    keep_prob = float(np.float32(1.0 - dropout.rate))
  f32 = lambda t: t.astype(jnp.float32)
  return native_attention.masked_attention(f32(q), f32(k), f32(v), f32(key_bias), seed,
                                           float(scale), threshold, keep_prob, rows=rows,
                                           cols=cols)



def composite_attention(qkv, heads: int, block_len: int, scale: float, weights_fn=None):
  """attention.composite_attention: one kernel call from the packed projections; with
  attention dropout, the block form on the kernel's block statistics."""
  if not native_attention.supports(qkv.shape[-1] // 3 // heads):
    return attention.composite_attention_blockwise(qkv, heads, block_len, scale, weights_fn)
  if weights_fn is None:
    return native_attention.composite_attention(qkv.astype(jnp.float32), heads, block_len,
                                                float(scale))
  return attention.composite_attention_blockwise(qkv, heads, block_len, scale, weights_fn,
                                                 stats_fn=native_attention.block_stats)


NATIVE = dataclasses.replace(
    ops_lib.CPU, name='native', dense=dense, layer_norm=native_norm.LayerNorm,
    attention=masked_attention, composite_attention=composite_attention,
    project_patterns=functools.partial(attention.project_patterns_folded,
                                       linear=native_dense.dense),
    gru_recurrence=native_gru.recurrence, attention_kl=native_attention.attention_kl,
    adam_update=native_adam.apply_update, table_zero_updates=native_adam.table_zero_updates)
