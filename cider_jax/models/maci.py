"""The MACI head around a base model: the Flax module (cider_jax/maci.py has the counterfactual
pass and τ, docs/maci.md the reasoning).

  model = MACI(base, num_classes=3, feature_dims=(Dl, Da, Dv))
  out = model.apply(variables, inputs, cls_feats, cls_probs, deterministic=True)

base(inputs, *, deterministic, **kwargs) → {'joint_rep': (B, D), ...}; cls_feats
(C, B, Dl+Da+Dv) and cls_probs (B, C) are the class prototypes and the label prior.
"""
from typing import Sequence

import flax.linen as nn
import jax

from cider_jax.models import ops as ops_lib
from cider_jax.models.mcm import MCM


class MACI(nn.Module):
  """A base model with the MCM causal classifier (or, disabled, a linear one) on its joint
  representation."""
  base: nn.Module
  num_classes: int
  feature_dims: Sequence[int]     # (Dl, Da, Dv): the sizes of the prototypes' three parts
  embed_dim: int = 32             # width of the MCM prototype encoders
  cross_dataset: bool = False     # parameter-free LayerNorms in the audio/vision encoders
  enabled: bool = True            # False: linear head, no counterfactual pass

  def setup(self):
    nn.share_scope(self, self.base)   # the base's parameters stay at the top level
    if self.enabled:
      self.head = MCM(self.num_classes, self.embed_dim, tuple(self.feature_dims),
                      self.cross_dataset, name='mcm')
    else:
      self.head = nn.Dense(self.num_classes, name='classifier')

  def __call__(self, inputs, cls_feats, cls_probs, *, deterministic: bool = True, **kwargs):
    """→ the base's outputs with `logp` (B, C); kwargs go to the base (e.g. reconstruct)."""
    out = dict(self.base(inputs, deterministic=deterministic, **kwargs))
    z = out['joint_rep']
    if self.enabled:
      out['logp'] = self.head(z, cls_feats, cls_probs)
    else:
      out['logp'] = jax.nn.log_softmax(self.head(z), axis=-1)
    return out

  @property
  def ops(self) -> ops_lib.Ops:
    """The base's implementations (models/ops.py), PLAIN if it has none."""
    return getattr(self.base, 'ops', ops_lib.PLAIN)
