"""WSAM: word-level single-head attention that aligns audio / vision to the text positions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cider_jax.kernels import attention as native_attention
from cider_jax.kernels import dense as native_dense

NEG = -1e9


def wsam_rows(text_mask, text_lengths):
  """Query rows that attend (B, L): valid text positions other than [CLS] (0) and [SEP] (len−1).

  text_mask (B, L) 0/1; text_lengths (B,) = sum of the attention mask.
  """
  pos = jnp.arange(text_mask.shape[1])[None, :]
  return text_mask * (pos != (text_lengths[:, None] - 1)) * (pos != 0)


def wsam_mask(text_mask, other_mask, text_lengths):
  """M (B, L, Lo) = rows[b, i] · other_valid[b, j] with rows = `wsam_rows` (0 for [CLS], [SEP])."""
  return wsam_rows(text_mask, text_lengths)[:, :, None] * other_mask[:, None, :]


class WSAM(nn.Module):
  """One-head attention: queries = projected text, keys = values = projected audio (or vision)."""
  embed_dim: int
  kernel: str = 'xla'   # 'native': one CPU kernel call (kernels.attention.masked_attention)

  @nn.compact
  def __call__(self, text, other, rows, cols):
    """text (B, L, E), other (B, Lo, E); rows (B, L) (`wsam_rows`) and cols (B, Lo) 0/1: the
    attention mask is rows ⊗ cols (`wsam_mask`). → (B, L, E); a row with no valid key or not
    in `rows` gets the output bias only."""
    E = self.embed_dim
    dense = lambda name: native_dense.make(self.kernel, E, name=name,
                                           kernel_init=nn.initializers.xavier_uniform())
    q = dense('query')(text) * np.float32(E ** -0.5)
    k = dense('key')(other)
    v = dense('value')(other)
    if self.kernel == 'native':
      # only the rows in `rows` and the valid keys are computed; the others' output is 0
      out = native_attention.masked_attention(
          q[:, :, None].astype(jnp.float32), k[:, :, None].astype(jnp.float32),
          v[:, :, None].astype(jnp.float32), jnp.zeros(cols.shape, jnp.float32),
          jnp.zeros((2,), jnp.uint32), 1.0, 0, 1.0, rows=rows, cols=cols)
      return dense('out')(out[:, :, 0])
    if self.kernel != 'xla':
      raise ValueError(f"WSAM kernel must be 'xla' or 'native', got {self.kernel!r}")
    mask = rows[:, :, None] * cols[:, None, :]
    scores = jnp.einsum('bqe,bke->bqk', q, k).astype(jnp.float32)
    scores = jnp.where(mask > 0, scores, scores + NEG)
    weights = jax.nn.softmax(scores, axis=-1) * mask
    out = jnp.einsum('bqk,bke->bqe', weights, v)
    return dense('out')(out)
