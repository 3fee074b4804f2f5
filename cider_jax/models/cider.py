"""The CIDer model (docs/model.md §2): the CIDer base (BERT, WSAM, GRUs, MCT, pooling, joint
representation, decoders) wrapped by MACI (cider_jax/maci.py). One pure `apply` serves the
teacher, student and counterfactual passes; they differ only in their inputs.

  model = CIDer(...)             # MACI(CIDerBase(...)); maci=False: the plain linear head
  out = model.apply(variables, inputs, cls_feats, cls_probs, deterministic=True, reconstruct=False)

`inputs` is a flat dict: text_ids, text_mask, text_segments (B, L); audio (B, La, Da),
audio_mask (B, La); vision (B, Lv, Dv), vision_mask (B, Lv). Returned dict:
  logp (B, C) log-probabilities (the head's), joint_rep (B, 3E), scores (B, H, 3L, 3L) raw
  scaled scores of the last MCT layer, attn_qk their factors (scaled queries, keys), each
  (B, H, 3L, D), text_hidden (B, L, Dl) encoder output; with reconstruct=True also
  text_recon (B, L, Dl), audio_recon (B, La, Da), vision_recon (B, Lv, Dv).
"""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cider_jax.models import gru, ops as ops_lib
from cider_jax.models.bert import BertConfig, BertEncoder
from cider_jax.models.maci import MACI
from cider_jax.models.mcm import AttentionPool, JointRep
from cider_jax.models.mct import MCT
from cider_jax.models.wsam import WSAM, wsam_rows


class SequenceDecoder(nn.Module):
  """Reconstruction of a (B, Lo, Do) sequence from (B, L, E): Linear(L → Lo) along time, ReLU,
  then Linear(E → Do)."""
  out_len: int
  out_dim: int
  ops: ops_lib.Ops = ops_lib.PLAIN

  @nn.compact
  def __call__(self, h):
    t = self.ops.dense(self.out_len, name='time')(jnp.swapaxes(h, 1, 2))
    return self.ops.dense(self.out_dim, name='feature')(jnp.swapaxes(jax.nn.relu(t), 1, 2))


class CIDerBase(nn.Module):
  """Everything of CIDer but its classifier: inputs → joint representation (B, 3E) and the
  outputs MSSD distils and reconstructs from."""
  bert: BertConfig
  aligned: bool
  feature_dims: Tuple[int, int, int]      # (Dl, Da, Dv)
  seq_lens: Tuple[int, int, int]          # (L, La, Lv)
  bert_layers: int = 0
  embed_dim: int = 32
  num_heads: int = 8
  layers: int = 3
  attn_dropout: float = 0.0
  relu_dropout: float = 0.0
  res_dropout: float = 0.0
  embed_dropout: float = 0.0
  out_dropout: float = 0.0
  positions: str = 'time'
  dtype: Any = jnp.float32                # the text encoder's matmul operands (matmul.Dense)
  ops: ops_lib.Ops = ops_lib.PLAIN        # the implementations (models/ops.py, backend.py)

  @nn.compact
  def __call__(self, inputs, *, deterministic: bool = True, reconstruct: bool = False):
    E = self.embed_dim
    L, La, Lv = self.seq_lens
    Dl, Da, Dv = self.feature_dims
    text_mask = inputs['text_mask'].astype(jnp.float32)
    audio_mask = inputs['audio_mask'].astype(jnp.float32)
    vision_mask = inputs['vision_mask'].astype(jnp.float32)
    ops = self.ops
    h_text = BertEncoder(self.bert, self.bert_layers, self.dtype, ops, name='text_encoder')(
        inputs['text_ids'], text_mask, inputs['text_segments'], deterministic,
        inputs.get('text_word_rows'))

    proj = lambda name: ops.dense(E, use_bias=False, name=name)
    x_l = proj('proj_l')(h_text)
    x_a = proj('proj_a')(inputs['audio'])
    x_v = proj('proj_v')(inputs['vision'])

    wsam_a = WSAM(E, ops, name='wsam_a')
    wsam_v = WSAM(E, ops, name='wsam_v')
    if self.aligned:
      if self.is_initializing():   # the original holds (and counts) WSAM weights in aligned mode
        wsam_a(x_l, x_a, jnp.ones(x_l.shape[:2]), jnp.ones(x_a.shape[:2]))
        wsam_v(x_l, x_v, jnp.ones(x_l.shape[:2]), jnp.ones(x_v.shape[:2]))
    else:
      lengths = jnp.sum(text_mask, axis=1).astype(jnp.int32)
      rows = wsam_rows(text_mask, lengths)
      x_a = wsam_a(x_l, x_a, rows, audio_mask)
      x_v = wsam_v(x_l, x_v, rows, vision_mask)

    # the three modality GRUs share one scan over the L word positions
    weights = [gru.GRUWeights(E, name=f'gru_{m}')(E) for m in 'lav']
    stacked = [jnp.stack(w) for w in zip(*weights)]
    hs = gru.gru(jnp.stack([x_l, x_a, x_v]), *stacked, recurrence_fn=ops.gru_recurrence)
    h = jnp.concatenate([hs[0], hs[1], hs[2]], axis=1)
    h, attn = MCT(E, self.num_heads, self.layers, self.attn_dropout, self.relu_dropout,
                    self.res_dropout, self.embed_dropout, self.positions, ops,
                    name='mct')(h, deterministic)
    h_l, h_a, h_v = h[:, :L], h[:, L:2 * L], h[:, 2 * L:]

    pooled = jnp.concatenate([AttentionPool(name=f'pool_{m}')(x)
                              for m, x in (('l', h_l), ('a', h_a), ('v', h_v))], axis=-1)
    z = JointRep(self.out_dropout, ops, name='joint')(pooled, deterministic)
    out = {'joint_rep': z, 'scores': attn['scores'], 'attn_qk': attn['qk'],
           'text_hidden': h_text}
    if reconstruct or self.is_initializing():
      out['text_recon'] = ops.dense(Dl, name='recon_text')(h_l)
      out['audio_recon'] = SequenceDecoder(La, Da, ops, name='recon_audio')(h_a)
      out['vision_recon'] = SequenceDecoder(Lv, Dv, ops, name='recon_vision')(h_v)
    return out


def CIDer(bert: BertConfig, num_classes: int, aligned: bool, feature_dims: Tuple[int, int, int],
          seq_lens: Tuple[int, int, int], *, embed_dim: int = 32, cross_dataset: bool = False,
          maci: bool = True, **base_fields) -> MACI:
  """CIDer = MACI(CIDerBase): the MCM head on the joint representation (maci=False: a plain
  linear head). base_fields: the other fields of CIDerBase (num_heads, layers, dropouts, …)."""
  base = CIDerBase(bert=bert, aligned=aligned, feature_dims=tuple(feature_dims),
                   seq_lens=tuple(seq_lens), embed_dim=embed_dim, **base_fields)
  return MACI(base, num_classes=num_classes, feature_dims=tuple(feature_dims),
              embed_dim=embed_dim, cross_dataset=cross_dataset, enabled=maci)


def example_inputs(batch: int, seq_lens, feature_dims, num_classes: int):
  """Zero inputs of the right shapes (for init / dry runs)."""
  L, La, Lv = seq_lens
  Dl, Da, Dv = feature_dims
  inputs = {
      'text_ids': jnp.zeros((batch, L), jnp.int32),
      'text_mask': jnp.ones((batch, L), jnp.float32),
      'text_segments': jnp.zeros((batch, L), jnp.int32),
      'audio': jnp.zeros((batch, La, Da), jnp.float32),
      'audio_mask': jnp.ones((batch, La), jnp.float32),
      'vision': jnp.zeros((batch, Lv, Dv), jnp.float32),
      'vision_mask': jnp.ones((batch, Lv), jnp.float32),
  }
  cls_feats = jnp.zeros((num_classes, batch, Dl + Da + Dv), jnp.float32)
  cls_probs = jnp.full((batch, num_classes), 1.0 / num_classes, jnp.float32)
  return inputs, cls_feats, cls_probs
