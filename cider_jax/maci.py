"""MACI around any base model: the MCM causal head (the module, models/maci.py), the
counterfactual pass and τ (docs/maci.md).

A base model is any Flax module that maps the model inputs to a joint representation:

  base(inputs, *, deterministic, **kwargs) -> {'joint_rep': (B, D), ...}

`inputs` is the flat dict of every model in cider_jax: text_ids, text_mask, text_segments
(B, L); audio (B, La, Da), audio_mask (B, La); vision (B, Lv, Dv), vision_mask (B, Lv). The
base may return more (auxiliary outputs; `aux_loss`, a scalar added to its training loss) and
knows nothing of MACI. Wrapped:

  model = MACI(base, num_classes=3, feature_dims=(Dl, Da, Dv))
  out = model.apply(variables, inputs, cls_feats, cls_probs, deterministic=True)
  out['logp']                                    # (B, C) log-probabilities, plus base's outputs
  logp_cf = model.apply(variables, counterfactual_inputs(inputs, bias_table), cls_feats,
                        cls_probs)['logp']       # the prediction from the bias words alone
  debiased = debias(out['logp'], logp_cf, tau)   # y − τ·y_cf, τ chosen on validation

The wrapper shares the base's parameter scope: the base's parameters keep their own names at
the top level of the tree (no extra 'base' level) and the head's are `mcm` (MACI) or
`classifier` (`enabled=False`: a plain linear head, no counterfactual pass — the "w/o MACI"
ablation). cls_feats (C, B, Dl+Da+Dv) are the class prototypes and cls_probs (B, C) the label
prior of the train split (cider_jax/prototypes.py); the plain head ignores them.
"""
import numpy as np

from cider_jax import counterfactual, metrics, tokens
from cider_jax.models.maci import MACI

__all__ = ['MACI', 'counterfactual_inputs', 'factual_and_counterfactual', 'enabled', 'debias',
           'select_tau']


def counterfactual_inputs(inputs, bias_table, special: tokens.SpecialTokens = tokens.BERT):
  """The counterfactual input: every text token that is neither special nor a bias word becomes
  [MASK]; audio and vision unchanged. bias_table (V,) bool (counterfactual.bias_lookup_table)."""
  ids = counterfactual.counterfactual_ids_jax(inputs['text_ids'], bias_table, special)
  return dict(inputs, text_ids=ids)


def factual_and_counterfactual(model, params, inputs, cls_feats, cls_probs, bias_table,
                               special: tokens.SpecialTokens = tokens.BERT):
  """{'logp': (B, C)} and, when MACI is enabled, 'logp_cf' (B, C): the evaluation passes."""
  apply = lambda x: model.apply({'params': params}, x, cls_feats, cls_probs,
                                deterministic=True)['logp']
  out = {'logp': apply(inputs)}
  if enabled(model):
    out['logp_cf'] = apply(counterfactual_inputs(inputs, bias_table, special))
  return out


def enabled(model) -> bool:
  """Whether `model` makes the counterfactual pass (a MACI with enabled=True)."""
  return bool(getattr(model, 'enabled', False))


def debias(logp, logp_cf, tau: float):
  """y − τ·y_cf on the log-probabilities, (B, C); τ a finite number >= 0 (ValueError)."""
  tau = float(tau)
  if not (np.isfinite(tau) and tau >= 0):
    raise ValueError(f'tau {tau!r}: τ must be a finite number >= 0 (0 = the factual prediction)')
  return np.asarray(logp, np.float64) - tau * np.asarray(logp_cf, np.float64)


def select_tau(valid_logp, valid_logp_cf, valid_labels, task: str, grid=(0.0, 3.0, 0.1)):
  """τ of the grid (start, stop inclusive, step) maximising the main metric (Non0_acc_2 /
  Acc_7) on the validation split; ties → smallest τ. → (τ, the metric at every grid value)."""
  return metrics.select_tau(valid_logp, valid_logp_cf, valid_labels, task,
                            metrics.tau_grid(*grid))
