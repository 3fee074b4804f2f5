"""MAG-BERT: BERT with a multimodal adaptation gate, a base model for MACI (docs/maci.md).

W. Rahman, M. K. Hasan, S. Lee, A. Zadeh, C. Mao, L.-P. Morency, E. Hoque, "Integrating
Multimodal Information in Large Pretrained Transformers", ACL 2020. The gate (MAG) shifts
every word representation e_i (Dl) of BERT's embedding layer by a displacement computed from
the word's audio a_i and vision v_i, before the first transformer layer:

  g_a = relu(W_ga [e; a] + b_a)        g_v = relu(W_gv [e; v] + b_v)          (B, L, Dl)
  H   = g_a ⊙ (W_a a) + g_v ⊙ (W_v v) + b_H
  α   = min(β · ‖e‖₂ / ‖H‖₂, 1)        (per word: the shift is never larger than β‖e‖)
  m   = dropout(LayerNorm(e + α H))

BERT then runs on m; the joint representation is the pooled output tanh(W_p s + b_p) (B, Dl)
with s the last layer's [CLS] state, as in BERT's pooler (`pooling='cls'`), or, for a sentence
encoder trained with mean pooling such as the packaged all-MiniLM-L6-v2, the mean of the
valid tokens' states (`pooling='mean'`; its [CLS] state was never trained to summarise).
MAG needs one audio and one vision vector per word: on aligned data they are the projected
frames of the word; on unaligned data the projected frames are aligned to the words first by
WSAM (models/wsam.py, queries from the projected embedding-layer output). The published model
trains with the task loss only; so does this one.

  base = MAGBert(bert_config, aligned=False)
  out = base.apply(variables, inputs, deterministic=True)   # {'joint_rep': (B, Dl),
                                                            #  'text_hidden': (B, L, Dl)}
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cider_jax.models import ops as ops_lib
from cider_jax.models.bert import BertConfig, BertEncoder
from cider_jax.models.wsam import WSAM, wsam_rows


def _norm(x):
  """‖x‖₂ over the last axis, (…, 1), with a finite gradient at x = 0 (a word whose audio and
  vision are zero, e.g. [CLS], has no shift)."""
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-12)


class MAG(nn.Module):
  """The multimodal adaptation gate: (e (B, L, Dl), a (B, L, Da'), v (B, L, Dv')) → (B, L, Dl)."""
  beta: float = 1.0
  dropout: float = 0.1
  eps: float = 1e-12               # the LayerNorm's
  ops: ops_lib.Ops = ops_lib.PLAIN

  @nn.compact
  def __call__(self, e, a, v, deterministic: bool):
    D = e.shape[-1]
    e = e.astype(jnp.float32)
    g_a = jax.nn.relu(nn.Dense(D, name='gate_a')(jnp.concatenate([e, a], -1)))
    g_v = jax.nn.relu(nn.Dense(D, name='gate_v')(jnp.concatenate([e, v], -1)))
    shift = (g_a * nn.Dense(D, use_bias=False, name='shift_a')(a)
             + g_v * nn.Dense(D, use_bias=False, name='shift_v')(v))
    shift = shift + self.param('shift_bias', nn.initializers.zeros, (D,))
    norm_e, norm_h = _norm(e), _norm(shift)
    alpha = jnp.minimum(self.beta * norm_e / (norm_h + 1e-6), 1.0)
    m = nn.LayerNorm(epsilon=self.eps, name='LayerNorm')(e + alpha * shift)
    return self.ops.dropout(self.dropout)(m, deterministic=deterministic)


class MAGBert(nn.Module):
  bert: BertConfig
  aligned: bool
  bert_layers: int = 0            # the text encoder's first k layers (0: all)
  embed_dim: int = 32             # E, the width audio and vision are projected to
  beta: float = 1.0               # MAG's β: the largest shift relative to ‖e‖
  pooling: str = 'cls'            # the sentence vector: 'cls' ([CLS]) or 'mean' (valid tokens)
  out_dropout: float = 0.0        # dropout on the pooled sentence vector
  dtype: Any = jnp.float32        # the text encoder's matmul operands
  ops: ops_lib.Ops = ops_lib.PLAIN

  @nn.compact
  def __call__(self, inputs, *, deterministic: bool = True):
    E, ops = self.embed_dim, self.ops
    text_mask = inputs['text_mask'].astype(jnp.float32)
    x_a = ops.dense(E, use_bias=False, name='proj_a')(inputs['audio'])
    x_v = ops.dense(E, use_bias=False, name='proj_v')(inputs['vision'])
    mag = MAG(self.beta, self.bert.hidden_dropout_prob, self.bert.layer_norm_eps, ops,
              name='mag')
    if self.aligned:
      per_word = lambda e: (x_a, x_v)
    else:
      proj_l = ops.dense(E, use_bias=False, name='proj_l')
      wsam_a, wsam_v = WSAM(E, ops, name='wsam_a'), WSAM(E, ops, name='wsam_v')
      rows = wsam_rows(text_mask, jnp.sum(text_mask, axis=1).astype(jnp.int32))

      def per_word(e):                 # (B, L, E) audio and vision aligned to the words
        q = proj_l(e.astype(jnp.float32))
        return (wsam_a(q, x_a, rows, inputs['audio_mask'].astype(jnp.float32)),
                wsam_v(q, x_v, rows, inputs['vision_mask'].astype(jnp.float32)))

    h = BertEncoder(self.bert, self.bert_layers, self.dtype, ops, name='text_encoder')(
        inputs['text_ids'], text_mask, inputs['text_segments'], deterministic,
        inputs.get('text_word_rows'), shift=lambda e: mag(e, *per_word(e), deterministic))
    if self.pooling == 'mean':   # a sentence encoder trained with mean pooling (MiniLM)
      sentence = jnp.sum(h * text_mask[..., None], 1) / jnp.maximum(
          jnp.sum(text_mask, 1, keepdims=True), 1.0)
    else:                        # BERT's pooler input, as published
      sentence = h[:, 0]
    pooled = jnp.tanh(nn.Dense(h.shape[-1], name='pooler')(sentence))
    pooled = ops.dropout(self.out_dropout)(pooled, deterministic=deterministic)
    return {'joint_rep': pooled, 'text_hidden': h}
