"""Late fusion: the simplest honest base model for MACI (docs/maci.md).

The text encoder's [CLS] output, the masked mean over time of the audio and of the vision
features, concatenated and mapped by an MLP to the joint representation:

  z = W2 · dropout(relu(W1 · [h_cls; mean_t(a); mean_t(v)] + b1)) + b2      (B, D)

  base = LateFusion(bert_config, joint_dim=96)
  out = base.apply(variables, inputs, deterministic=True)   # {'joint_rep': (B, D),
                                                            #  'text_hidden': (B, L, Dl)}
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cider_jax.models import ops as ops_lib
from cider_jax.models.bert import BertConfig, BertEncoder


def masked_mean(x, mask):
  """x (B, T, D), mask (B, T) 0/1 → (B, D): the mean over the valid steps (0 if none)."""
  mask = mask.astype(x.dtype)[..., None]
  return jnp.sum(x * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


class LateFusion(nn.Module):
  bert: BertConfig
  bert_layers: int = 0            # the text encoder's first k layers (0: all)
  joint_dim: int = 96             # D, the joint representation's width
  hidden_dim: int = 96            # the MLP's hidden width
  out_dropout: float = 0.0        # dropout on the MLP's hidden layer
  dtype: Any = jnp.float32        # the text encoder's matmul operands
  ops: ops_lib.Ops = ops_lib.PLAIN

  @nn.compact
  def __call__(self, inputs, *, deterministic: bool = True):
    text_mask = inputs['text_mask'].astype(jnp.float32)
    h_text = BertEncoder(self.bert, self.bert_layers, self.dtype, self.ops, name='text_encoder')(
        inputs['text_ids'], text_mask, inputs['text_segments'], deterministic,
        inputs.get('text_word_rows'))
    x = jnp.concatenate([h_text[:, 0], masked_mean(inputs['audio'], inputs['audio_mask']),
                         masked_mean(inputs['vision'], inputs['vision_mask'])], axis=-1)
    h = jax.nn.relu(nn.Dense(self.hidden_dim, name='fusion_hidden')(x))
    h = self.ops.dropout(self.out_dropout)(h, deterministic=deterministic)
    return {'joint_rep': nn.Dense(self.joint_dim, name='fusion_out')(h), 'text_hidden': h_text}
