"""The CIDer model (REFERENCE §2): one pure `apply` serves the teacher, student and
counterfactual passes; they differ only in their inputs.

  model = CIDer(...)
  out = model.apply(variables, inputs, cls_feats, cls_probs, deterministic=True, reconstruct=False)

`inputs` is a flat dict: text_ids, text_mask, text_segments (B, L); audio (B, La, Da),
audio_mask (B, La); vision (B, Lv, Dv), vision_mask (B, Lv). Returned dict:
  logp (B, C) log-probabilities, joint_rep (B, 3E), scores (B, H, 3L, 3L) raw scaled scores of
  the last MCT layer, attn_qk their factors (scaled queries, keys), each (B, H, 3L, D),
  text_hidden (B, L, Dl) encoder output; with reconstruct=True also
  text_recon (B, L, Dl), audio_recon (B, La, Da), vision_recon (B, Lv, Dv).
"""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cider_jax.kernels import attention as native_attention
from cider_jax.kernels import dense as native_dense
from cider_jax.kernels import gru as native_gru
from cider_jax.models.bert import BertConfig, BertEncoder, attention_kernel
from cider_jax.models.mcm import MCM, AttentionPool, JointRep
from cider_jax.models.mct import MCT
from cider_jax.models.wsam import WSAM, wsam_rows


class GRUWeights(nn.Module):
  """Parameters of a one-layer GRU, torch layout: gates r|z|n, separate input/hidden biases."""
  hidden: int

  @nn.compact
  def __call__(self, in_dim: int):
    H = self.hidden
    bound = H ** -0.5
    init = lambda k, s: jax.random.uniform(k, s, jnp.float32, -bound, bound)
    return (self.param('w_ih', init, (in_dim, 3 * H)), self.param('w_hh', init, (H, 3 * H)),
            self.param('b_ih', init, (3 * H,)), self.param('b_hh', init, (3 * H,)))


def gru_scan(x, w_ih, w_hh, b_ih, b_hh, kernel='xla'):
  """M independent GRUs run in one scan over time (initial state zero, all steps).

  x (M, B, T, E); w_ih (M, E, 3H), w_hh (M, H, 3H), b_ih / b_hh (M, 3H) → (M, B, T, H).
  kernel 'native': the recurrence is one CPU kernel call (kernels.gru), 'xla': a lax.scan.
  """
  H = w_hh.shape[1]
  gx = jnp.einsum('mbte,meg->mbtg', x, w_ih) + b_ih[:, None, None, :]
  if kernel == 'native':
    return native_gru.recurrence(gx, w_hh, b_hh)

  def step(h, g):
    gh = jnp.einsum('mbh,mhg->mbg', h, w_hh) + b_hh[:, None, :]
    r = jax.nn.sigmoid(g[..., :H] + gh[..., :H])
    z = jax.nn.sigmoid(g[..., H:2 * H] + gh[..., H:2 * H])
    n = jnp.tanh(g[..., 2 * H:] + r * gh[..., 2 * H:])
    h = (1.0 - z) * n + z * h
    return h, h

  h0 = jnp.zeros(x.shape[:2] + (H,), jnp.float32)
  _, hs = jax.lax.scan(step, h0, jnp.moveaxis(gx, 2, 0))   # (T, M, B, H)
  return jnp.moveaxis(hs, 0, 2)


class SequenceDecoder(nn.Module):
  """Reconstruction of a (B, Lo, Do) sequence from (B, L, E): Linear(L → Lo) along time, ReLU,
  then Linear(E → Do)."""
  out_len: int
  out_dim: int
  kernel: str = 'xla'   # 'native': the Dense weight gradients by kernels.dense

  @nn.compact
  def __call__(self, h):
    dense = lambda n, name: native_dense.make(self.kernel, n, name=name)
    t = dense(self.out_len, 'time')(jnp.swapaxes(h, 1, 2))
    return dense(self.out_dim, 'feature')(jnp.swapaxes(jax.nn.relu(t), 1, 2))


class CIDer(nn.Module):
  bert: BertConfig
  num_classes: int
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
  cross_dataset: bool = False
  dtype: Any = jnp.float32                # the text encoder's matmul operands (matmul.Dense)
  kernels: str = 'xla'                    # 'native': CPU kernels (spec.resolve_kernels)

  @nn.compact
  def __call__(self, inputs, cls_feats, cls_probs, *, deterministic: bool = True,
               reconstruct: bool = False):
    E = self.embed_dim
    L, La, Lv = self.seq_lens
    Dl, Da, Dv = self.feature_dims
    text_mask = inputs['text_mask'].astype(jnp.float32)
    audio_mask = inputs['audio_mask'].astype(jnp.float32)
    vision_mask = inputs['vision_mask'].astype(jnp.float32)
    h_text = BertEncoder(self.bert, self.bert_layers, self.dtype,
                         attention_kernel(self.kernels, self.bert), self.kernels,
                         name='text_encoder')(
        inputs['text_ids'], text_mask, inputs['text_segments'], deterministic,
        inputs.get('text_word_rows'))

    proj = lambda name: native_dense.make(self.kernels, E, use_bias=False, name=name)
    x_l = proj('proj_l')(h_text)
    x_a = proj('proj_a')(inputs['audio'])
    x_v = proj('proj_v')(inputs['vision'])

    wsam_kernel = native_attention.kernel_for(self.kernels, E)   # one head of size E
    wsam_a = WSAM(E, wsam_kernel, name='wsam_a')
    wsam_v = WSAM(E, wsam_kernel, name='wsam_v')
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
    weights = [GRUWeights(E, name=f'gru_{m}')(E) for m in 'lav']
    stacked = [jnp.stack(w) for w in zip(*weights)]
    hs = gru_scan(jnp.stack([x_l, x_a, x_v]), *stacked, kernel=self.kernels)
    h = jnp.concatenate([hs[0], hs[1], hs[2]], axis=1)
    h, attn = MCT(E, self.num_heads, self.layers, self.attn_dropout, self.relu_dropout,
                    self.res_dropout, self.embed_dropout, self.positions,
                    self.kernels, name='mct')(h, deterministic)
    h_l, h_a, h_v = h[:, :L], h[:, L:2 * L], h[:, 2 * L:]

    pooled = jnp.concatenate([AttentionPool(name=f'pool_{m}')(x)
                              for m, x in (('l', h_l), ('a', h_a), ('v', h_v))], axis=-1)
    z = JointRep(self.out_dropout, name='joint')(pooled, deterministic)
    logp = MCM(self.num_classes, E, self.feature_dims, self.cross_dataset,
               name='mcm')(z, cls_feats, cls_probs)
    out = {'logp': logp, 'joint_rep': z, 'scores': attn['scores'], 'attn_qk': attn['qk'],
           'text_hidden': h_text}
    if reconstruct or self.is_initializing():
      out['text_recon'] = native_dense.make(self.kernels, Dl, name='recon_text')(h_l)
      out['audio_recon'] = SequenceDecoder(La, Da, self.kernels, name='recon_audio')(h_a)
      out['vision_recon'] = SequenceDecoder(Lv, Dv, self.kernels, name='recon_vision')(h_v)
    return out


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
