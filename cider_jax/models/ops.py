"""The implementations a model is built from, injected as one value.

Every module of the model takes an `ops: Ops` field and builds its layers from it, the way
flax's own modules take `dense: ModuleDef = nn.Dense` or an `attention_fn`. The defaults are
the plain JAX forms of the algorithm; cider_jax/backend.py chooses, in one place, the forms
measured faster on the machine at hand (the native CPU kernels of cider_jax/kernels/, the CPU
forms below) and hands them to the model. No module compares backend names.

Each field is a callable with the signature of its default:
- dense(features, dtype=float32, **nn.Dense kwargs) → a module with nn.Dense's parameters
- layer_norm(epsilon=..., name=...) → a module with nn.LayerNorm's parameters (the MCT's)
- dropout(rate) → a module called as (x, deterministic=...)
- attention(q, k, v, key_bias, *, scale, dropout, rows, cols): attention.masked_attention
- composite_attention(qkv, heads, block_len, scale, weights_fn): attention.composite_attention
- project_patterns(o, out_kernel, out_bias, summary_kernel, summary_bias, final_kernel,
  final_bias): attention.project_patterns
- gru_recurrence(gx, w_hh, b_hh): gru.recurrence
- attention_kl(q_t, k_t, q_s, k_s) → per-query KL (..., T): losses.attention_kl_rows
and, for the train step's optimizer updates (updates.py):
- adam_update(tx, labels, params, grads, opt_state, *, cfg, skip, lead, after, scale):
  optim.apply_update
- table_zero_updates(table, mu, nu, ids, count, steps, *, cfg, group, lead, scale):
  embedding_rows.table_zero_updates
- row_wise_embeddings: whether the word-embedding table is updated row-wise by default
"""
import dataclasses
from typing import Callable

import flax.linen as nn

from cider_jax import embedding_rows, losses, optim
from cider_jax.models import attention as attention_lib
from cider_jax.models import dropout as dropout_lib
from cider_jax.models import gru, matmul


@dataclasses.dataclass(frozen=True)
class Ops:
  name: str = 'plain'
  dense: Callable = matmul.Dense
  layer_norm: Callable = nn.LayerNorm
  dropout: Callable = nn.Dropout
  attention: Callable = attention_lib.masked_attention
  composite_attention: Callable = attention_lib.composite_attention
  project_patterns: Callable = attention_lib.project_patterns
  gru_recurrence: Callable = gru.recurrence
  attention_kl: Callable = losses.attention_kl_rows
  adam_update: Callable = optim.apply_update
  table_zero_updates: Callable = embedding_rows.table_zero_updates
  row_wise_embeddings: bool = False


PLAIN = Ops()

# The plain-JAX forms measured faster on the CPU (docs/performance.md): dropout bits from a
# counter hash instead of a threefry stream, the composite attention reduced per key block,
# the MCT's three output linears folded into one product, the word-embedding table's
# updates taken row-wise.
CPU = dataclasses.replace(PLAIN, name='cpu', dropout=dropout_lib.Dropout,
                          composite_attention=attention_lib.composite_attention_blockwise,
                          project_patterns=attention_lib.project_patterns_folded,
                          row_wise_embeddings=True)
