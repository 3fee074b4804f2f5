"""The original's trained models in cider_jax: read an export (`export_original`), build the
Flax model from the file alone.

  model, variables = load_original('mosi_unaligned.npz')
  out = model.apply(variables, inputs, cls_feats, cls_probs, deterministic=True)
  out['logp']   # the original's log-probabilities on the same inputs

The model has `positions='reference'` (the original's positional encodings, docs/model.md §7),
so it computes what the original computed with those weights.
"""
import json
from typing import Any, Dict, Tuple

import jax
import numpy as np

from cider_jax import backend
from cider_jax.compat import export_original
from cider_jax.compat.reference import infer_structure, torch_to_flax
from cider_jax.models import ops as ops_lib
from cider_jax.models.bert import BertConfig
from cider_jax.models.cider import CIDer, example_inputs


class OriginalWeightsError(ValueError):
  """An export that cannot be read or does not fit (the message names the file and field)."""


def read_export(path) -> Tuple[Dict[str, np.ndarray], dict]:
  """(state dict {torch name: array}, meta {'hparams', 'bert', …}) of an export or a parity
  fixture (same `param/*` + `meta_json` format)."""
  try:
    with np.load(path, allow_pickle=False) as z:
      files = set(z.files)
      if 'meta_json' not in files:
        raise OriginalWeightsError(f'{path}: no meta_json: not a file written by python -m '
                                   'cider_jax.compat.export_original')
      meta = json.loads(str(z['meta_json']))
      state = {k[len('param/'):]: z[k] for k in files if k.startswith('param/')}
  except FileNotFoundError:
    raise OriginalWeightsError(f'{path}: no such file') from None
  except (OSError, ValueError) as e:
    if isinstance(e, OriginalWeightsError):
      raise
    raise OriginalWeightsError(f'{path}: not an .npz export ({e})') from None
  for key in ('hparams', 'bert'):
    if key not in meta:
      raise OriginalWeightsError(f'{path}: meta_json has no {key!r}')
  if meta.get('format', export_original.FORMAT) != export_original.FORMAT:
    raise OriginalWeightsError(f'{path}: format {meta.get("format")!r}, expected '
                               f'{export_original.FORMAT!r}')
  if not state:
    raise OriginalWeightsError(f'{path}: no param/* arrays')
  return state, meta


def build_reference_model(state, bert: dict, aligned: bool, num_heads: int, seq_lens,
                          kernels: Any = 'auto') -> Tuple[CIDer, bool]:
  """(model, cross_dataset): the Flax CIDer (`positions='reference'`) of an original state
  dict. seq_lens (L, La, Lv); kernels: a model.kernels choice or a models.ops.Ops."""
  layers, num_classes, cross = infer_structure(state)
  dims = tuple(int(state[f'proj_{m}.weight'].shape[1]) for m in 'lav')
  E = int(state['proj_l.weight'].shape[0])
  if E % num_heads:
    raise OriginalWeightsError(f'hparams.num_heads {num_heads} does not divide the embed dim {E}')
  ops = kernels if isinstance(kernels, ops_lib.Ops) else backend.select(kernels, E // num_heads)
  model = CIDer(BertConfig.from_dict(bert), num_classes, bool(aligned), dims,
                tuple(int(n) for n in seq_lens), embed_dim=E, num_heads=int(num_heads),
                layers=layers, positions='reference', cross_dataset=cross, ops=ops)
  return model, cross


def load_original(path, kernels: Any = 'auto') -> Tuple[CIDer, dict]:
  """(model, variables) of an export: the architecture from its hyper-parameters and shapes,
  the weights converted to Flax and checked against the model's own shapes."""
  state, meta = read_export(path)
  hp = meta['hparams']
  try:
    seq = (hp['l_len'], hp['a_len'], hp['v_len'])
    model, _ = build_reference_model(state, meta['bert'], hp['aligned'], int(hp['num_heads']),
                                     seq, kernels)
    params = torch_to_flax(state)
  except KeyError as e:
    raise OriginalWeightsError(f'{path}: missing {e} (hparams or state dict)') from None
  want = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *example_inputs(
      1, model.base.seq_lens, model.feature_dims, model.num_classes)))['params']
  _check_shapes(path, want, params)
  return model, {'params': params}


def _check_shapes(path, want, got, prefix=()):
  """OriginalWeightsError naming the first parameter whose shape or presence differs."""
  names = set(want) | set(got)
  for k in sorted(names):
    where = '/'.join(prefix + (k,))
    if k not in got:
      raise OriginalWeightsError(f'{path}: parameter {where} is missing from the export')
    if k not in want:
      raise OriginalWeightsError(f'{path}: parameter {where} is not part of the model')
    if isinstance(want[k], dict):
      _check_shapes(path, want[k], got[k], prefix + (k,))
    elif tuple(want[k].shape) != tuple(np.shape(got[k])):
      raise OriginalWeightsError(f'{path}: parameter {where} has shape {tuple(np.shape(got[k]))}'
                                 f', the hyper-parameters ask for {tuple(want[k].shape)}')
