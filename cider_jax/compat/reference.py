"""The original PyTorch CIDer's state dict (numpy arrays by torch name) ↔ Flax variables.

  params = torch_to_flax(state_dict)          # {'text_encoder': …, 'mct': …, …}
  state_dict = flax_to_torch(params)          # inverse; also regenerates the buffers

Layouts: torch Linear weight is (out, in), Flax kernel (in, out); the projections are
kernel-1 Conv1d (E, D, 1); q|k|v are stacked in `in_proj_weight`; GRU gates r|z|n.
"""
import re
from typing import Dict, Mapping

import numpy as np

from cider_jax.models import bert
from cider_jax.models.mct import sinusoids

BERT_PREFIX = 'text_model.model.'
BUFFERS = ('multimodal_transformer.version', 'multimodal_transformer.embed_positions.pe')


def _linear_pairs(cross_dataset: bool, layers: int, num_classes: int):
  """(torch module name, flax path) for every plain Linear (weight (out,in) + bias)."""
  pairs = [('proj1', ('joint', 'proj1')), ('proj2', ('joint', 'proj2')),
           ('recon_text', ('recon_text',))]
  for m in 'av':
    name = {'a': 'audio', 'v': 'vision'}[m]
    pairs += [(f'recon_{name}.0', (f'recon_{name}', 'time')),
              (f'recon_{name}.1', (f'recon_{name}', 'feature')),
              (f'{m}_compress.out_proj', (f'wsam_{m}', 'out'))]
  for m in 'lav':
    pairs += [(f'attn_{m}.attention.0', (f'pool_{m}', 'hidden')),
              (f'attn_{m}.attention.2', (f'pool_{m}', 'score'))]
    idx = (0, 3, 6) if cross_dataset and m != 'l' else (0, 2, 4)
    pairs += [(f'cls_encoders_{m}.{j}', ('mcm', f'encoder_{m}', f'dense_{i}'))
              for i, j in enumerate(idx)]
  for i in range(layers):
    t, f = f'multimodal_transformer.layers.{i}', ('mct', f'layer_{i}')
    pairs += [(f'{t}.self_attn.final_out_proj', f + ('attention', 'final_out')),
              (f'{t}.fc1', f + ('fc1',)), (f'{t}.fc2', f + ('fc2',))]
    pairs += [(f'{t}.self_attn.s_{m}', f + ('attention', f'summary_{m}')) for m in 'lav']
  return pairs


def _layer_norm_pairs(layers: int):
  pairs = [('multimodal_transformer.layer_norm', ('mct', 'ln_final'))]
  for i in range(layers):
    t, f = f'multimodal_transformer.layers.{i}', ('mct', f'layer_{i}')
    pairs += [(f'{t}.layer_norms.0', f + ('ln_attn',)), (f'{t}.layer_norms.1', f + ('ln_ffn',))]
  return pairs


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = np.asarray(value, np.float32)


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return np.asarray(tree)


def infer_structure(state: Mapping[str, np.ndarray]):
  """(layers, num_classes, cross_dataset) read off a state dict's names and shapes."""
  layers = 1 + max(int(m.group(1)) for k in state
                   for m in [re.match(r'multimodal_transformer\.layers\.(\d+)\.', k)] if m)
  num_classes = state['classifiers.0.weight'].shape[0]
  cross_dataset = 'cls_encoders_a.3.weight' in state
  return layers, num_classes, cross_dataset


def torch_to_flax(state: Mapping[str, np.ndarray]) -> Dict:
  """Original state dict → Flax params tree of `CIDer`."""
  state = {k: np.asarray(v) for k, v in state.items()}
  layers, num_classes, cross = infer_structure(state)
  used = set(BUFFERS)
  p: Dict = {}
  bert_state = {k[len(BERT_PREFIX):]: v for k, v in state.items() if k.startswith(BERT_PREFIX)}
  used |= {BERT_PREFIX + k for k in bert_state}
  p['text_encoder'] = bert.hf_to_flax(bert_state)

  def take(name):
    used.add(name)
    return state[name]

  for tname, fpath in _linear_pairs(cross, layers, num_classes):
    _set(p, fpath + ('kernel',), take(f'{tname}.weight').T)
    _set(p, fpath + ('bias',), take(f'{tname}.bias'))
  for tname, fpath in _layer_norm_pairs(layers):
    _set(p, fpath + ('scale',), take(f'{tname}.weight'))
    _set(p, fpath + ('bias',), take(f'{tname}.bias'))
  for m in 'lav':
    _set(p, (f'proj_{m}', 'kernel'), take(f'proj_{m}.weight')[:, :, 0].T)
    g = {'l': 't', 'a': 'a', 'v': 'v'}[m]
    for w in ('ih', 'hh'):
      _set(p, (f'gru_{m}', f'w_{w}'), take(f'{g}.weight_{w}_l0').T)
      _set(p, (f'gru_{m}', f'b_{w}'), take(f'{g}.bias_{w}_l0'))
  for m in 'av':
    w = np.split(take(f'{m}_compress.in_proj_weight'), 3, axis=0)
    b = np.split(take(f'{m}_compress.in_proj_bias'), 3)
    for name, wi, bi in zip(('query', 'key', 'value'), w, b):
      _set(p, (f'wsam_{m}', name, 'kernel'), wi.T)
      _set(p, (f'wsam_{m}', name, 'bias'), bi)
  for i in range(layers):
    t, f = f'multimodal_transformer.layers.{i}.self_attn', ('mct', f'layer_{i}', 'attention')
    _set(p, f + ('qkv', 'kernel'), take(f'{t}.in_proj_weight').T)
    _set(p, f + ('qkv', 'bias'), take(f'{t}.in_proj_bias'))
    _set(p, f + ('out_kernel',), np.stack([take(f'{t}.out_proj.{j}.weight').T for j in range(7)]))
    _set(p, f + ('out_bias',), np.stack([take(f'{t}.out_proj.{j}.bias') for j in range(7)]))
  _set(p, ('mcm', 'classifier_kernel'),
       np.stack([take(f'classifiers.{i}.weight').T for i in range(num_classes)]))
  _set(p, ('mcm', 'classifier_bias'),
       np.stack([take(f'classifiers.{i}.bias') for i in range(num_classes)]))
  unused = sorted(set(state) - used)
  if unused:
    raise KeyError(f'state dict entries not understood: {unused[:8]}')
  return p


def flax_to_torch(params: Mapping, cross_dataset: bool = False) -> Dict[str, np.ndarray]:
  """Flax params tree of `CIDer` → original state dict (buffers regenerated).

  cross_dataset: the variant whose audio/vision encoders hold parameter-free LayerNorms, so
  their linears sit at Sequential indices 0, 3, 6 (not visible in the params themselves).
  """
  layers = len([k for k in params['mct'] if k.startswith('layer_')])
  num_classes = np.shape(params['mcm']['classifier_bias'])[0]
  out: Dict[str, np.ndarray] = {}
  for k, v in bert.flax_to_hf(params['text_encoder']).items():
    out[BERT_PREFIX + k] = v
  E = np.shape(params['proj_l']['kernel'])[1]
  for tname, fpath in _linear_pairs(cross_dataset, layers, num_classes):
    out[f'{tname}.weight'] = _get(params, fpath + ('kernel',)).T
    out[f'{tname}.bias'] = _get(params, fpath + ('bias',))
  for tname, fpath in _layer_norm_pairs(layers):
    out[f'{tname}.weight'] = _get(params, fpath + ('scale',))
    out[f'{tname}.bias'] = _get(params, fpath + ('bias',))
  for m in 'lav':
    out[f'proj_{m}.weight'] = _get(params, (f'proj_{m}', 'kernel')).T[:, :, None]
    g = {'l': 't', 'a': 'a', 'v': 'v'}[m]
    for w in ('ih', 'hh'):
      out[f'{g}.weight_{w}_l0'] = _get(params, (f'gru_{m}', f'w_{w}')).T
      out[f'{g}.bias_{w}_l0'] = _get(params, (f'gru_{m}', f'b_{w}'))
  for m in 'av':
    out[f'{m}_compress.in_proj_weight'] = np.concatenate(
        [_get(params, (f'wsam_{m}', n, 'kernel')).T for n in ('query', 'key', 'value')])
    out[f'{m}_compress.in_proj_bias'] = np.concatenate(
        [_get(params, (f'wsam_{m}', n, 'bias')) for n in ('query', 'key', 'value')])
  for i in range(layers):
    t, f = f'multimodal_transformer.layers.{i}.self_attn', ('mct', f'layer_{i}', 'attention')
    out[f'{t}.in_proj_weight'] = _get(params, f + ('qkv', 'kernel')).T
    out[f'{t}.in_proj_bias'] = _get(params, f + ('qkv', 'bias'))
    for j in range(7):
      out[f'{t}.out_proj.{j}.weight'] = _get(params, f + ('out_kernel',))[j].T
      out[f'{t}.out_proj.{j}.bias'] = _get(params, f + ('out_bias',))[j]
  for i in range(num_classes):
    out[f'classifiers.{i}.weight'] = _get(params, ('mcm', 'classifier_kernel'))[i].T
    out[f'classifiers.{i}.bias'] = _get(params, ('mcm', 'classifier_bias'))[i]
  out['multimodal_transformer.version'] = np.array([2.0], np.float32)
  out['multimodal_transformer.embed_positions.pe'] = sinusoids(1024, E)[None]
  return out
