"""WSAM: word-level single-head attention that aligns audio / vision to the text positions
(docs/model.md §2, step 3)."""

import flax.linen as nn
import jax.numpy as jnp

from cider_jax.models import ops as ops_lib


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
  ops: ops_lib.Ops = ops_lib.PLAIN

  @nn.compact
  def __call__(self, text, other, rows, cols):
    """text (B, L, E), other (B, Lo, E); rows (B, L) (`wsam_rows`) and cols (B, Lo) 0/1: the
    attention mask is rows ⊗ cols (`wsam_mask`). → (B, L, E); a row with no valid key or not
    in `rows` gets the output bias only."""
    E = self.embed_dim
    dense = lambda name: self.ops.dense(E, name=name,
                                        kernel_init=nn.initializers.xavier_uniform())
    one_head = lambda t: t[:, :, None, :]
    out = self.ops.attention(one_head(dense('query')(text)), one_head(dense('key')(other)),
                             one_head(dense('value')(other)),
                             jnp.zeros(cols.shape, jnp.float32), scale=E ** -0.5,
                             rows=rows, cols=cols)
    return dense('out')(out[:, :, 0])
