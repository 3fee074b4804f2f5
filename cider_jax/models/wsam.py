"""WSAM: word-level single-head attention that aligns audio / vision to the text positions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NEG = -1e9


def wsam_mask(text_mask, other_mask, text_lengths):
  """M (B, L, Lo) = text_valid[b, i] · other_valid[b, j], rows of [CLS] (0) and [SEP] (len−1) zero.

  text_mask (B, L), other_mask (B, Lo) 0/1; text_lengths (B,) = sum of the attention mask.
  """
  L = text_mask.shape[1]
  pos = jnp.arange(L)[None, :]
  rows = text_mask * (pos != (text_lengths[:, None] - 1)) * (pos != 0)
  return rows[:, :, None] * other_mask[:, None, :]


class WSAM(nn.Module):
  """One-head attention: queries = projected text, keys = values = projected audio (or vision)."""
  embed_dim: int

  @nn.compact
  def __call__(self, text, other, mask):
    """text (B, L, E), other (B, Lo, E), mask (B, L, Lo) from `wsam_mask` → (B, L, E)."""
    E = self.embed_dim
    dense = lambda name: nn.Dense(E, name=name, kernel_init=nn.initializers.xavier_uniform())
    q = dense('query')(text) * np.float32(E ** -0.5)
    k = dense('key')(other)
    v = dense('value')(other)
    scores = jnp.einsum('bqe,bke->bqk', q, k).astype(jnp.float32)
    scores = jnp.where(mask > 0, scores, scores + NEG)
    weights = jax.nn.softmax(scores, axis=-1) * mask
    out = jnp.einsum('bqk,bke->bqe', weights, v)
    return dense('out')(out)
