"""What the model's shapes depend on, read from the data (or, for a dry run, nominal values).

  spec = spec_from_split(train_split, config)   # lengths and feature sizes of the real data
  model = build_model(config, spec)
"""
import dataclasses
import sys
from typing import Tuple

import jax
import jax.numpy as jnp

from cider_jax import backend, configuration
from cider_jax.models.maci import MACI
from cider_jax.models import bert, late_fusion, mag_bert
from cider_jax.models.cider import CIDer, example_inputs

NUM_CLASSES = {'binary': 3, 'seven': 7}

# Nominal shapes of the MMSA files (docs/model.md §1), used only by `--dry_run`, which builds the
# model without reading any data: (L, La, Lv), (Da, Dv).
NOMINAL = {
    ('mosi', False): ((50, 375, 500), (5, 20)),
    ('mosi', True): ((50, 50, 50), (5, 20)),
    ('mosei', False): ((50, 500, 500), (74, 35)),
    ('mosei', True): ((50, 50, 50), (74, 35)),
}
NOMINAL_CROSS = {'mosi': ((44, 44, 44), (25, 171)), 'mosei': ((75, 75, 75), (25, 171))}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  seq_lens: Tuple[int, int, int]      # (L, La, Lv)
  feature_dims: Tuple[int, int]       # (Da, Dv); Dl comes from the text encoder
  num_classes: int
  aligned: bool


def num_classes(task: str) -> int:
  if task not in NUM_CLASSES:
    raise ValueError(f'config.task must be one of {sorted(NUM_CLASSES)}, got {task!r}')
  return NUM_CLASSES[task]


def spec_from_split(split, config) -> ModelSpec:
  """Shapes of a loaded split (cider_jax.data.mmsa.Split)."""
  L = split.text_ids.shape[1]
  La, Da = split.audio.shape[1:]
  Lv, Dv = split.vision.shape[1:]
  aligned = bool(config.data.aligned)
  if aligned and not (La == Lv == L):
    raise ValueError(f'data.aligned=True needs audio/vision lengths equal to the text length '
                     f'{L}, got audio {La}, vision {Lv}: is this an unaligned file?')
  return ModelSpec((L, La, Lv), (Da, Dv), num_classes(config.task), aligned)


def nominal_spec(config) -> ModelSpec:
  """Shapes without data: the synthetic config's sizes, or the MMSA files' nominal ones."""
  d = config.data
  if d.source == 'synthetic':
    s = d.synthetic
    lens = (s.text_len,) * 3 if d.aligned else (s.text_len, s.audio_len, s.vision_len)
    return ModelSpec(lens, (s.audio_dim, s.vision_dim), num_classes(config.task), bool(d.aligned))
  if d.setting == 'cross_dataset':
    lens, dims = NOMINAL_CROSS[d.dataset]
  else:
    lens, dims = NOMINAL[(d.dataset, bool(d.aligned))]
  return ModelSpec(lens, dims, num_classes(config.task), bool(d.aligned))


def text_encoder_config(config, allow_default: bool = False) -> bert.BertConfig:
  """The BERT config of model.text_encoder.path; bert-base-uncased's if absent and allowed."""
  try:
    return bert.read_config(config.model.text_encoder.path)
  except FileNotFoundError:
    if not allow_default:
      raise
    print(f'note: no text encoder at {config.model.text_encoder.path!r}; '
          'using the bert-base-uncased configuration', file=sys.stderr)
    return bert.BertConfig()


MODEL_NAMES = configuration.MODEL_NAMES   # config.model.name


def build_model(config, spec: ModelSpec, bert_config: bert.BertConfig) -> MACI:
  """The base model of config.model.name wrapped by MACI (config.maci.enabled: the MCM head
  and the counterfactual pass; False: a plain linear head)."""
  m = config.model
  if m.embed_dim % m.num_heads:
    raise ValueError(f'model.num_heads={m.num_heads} must divide model.embed_dim={m.embed_dim}')
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}.get(m.dtype)
  if dtype is None:
    raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {m.dtype!r}")
  name = m.get('name', 'cider')
  if name not in MODEL_NAMES:
    raise ValueError(f'model.name must be one of {", ".join(MODEL_NAMES)}, got {name!r}')
  drop = lambda v: 0.0 if m.deterministic else v
  ops = backend.select(m.kernels, m.embed_dim // m.num_heads)
  dims = (bert_config.hidden_size,) + tuple(spec.feature_dims)
  enabled = bool(config.get('maci', {}).get('enabled', True))
  if name == 'cider':
    return CIDer(
        bert_config, spec.num_classes, spec.aligned, dims, tuple(spec.seq_lens),
        bert_layers=m.text_encoder.num_layers, embed_dim=m.embed_dim, num_heads=m.num_heads,
        layers=m.layers, attn_dropout=drop(m.attn_dropout), relu_dropout=drop(m.relu_dropout),
        res_dropout=drop(m.res_dropout), embed_dropout=drop(m.embed_dropout),
        out_dropout=drop(m.out_dropout), positions=m.positions,
        cross_dataset=bool(m.cross_dataset), dtype=dtype, ops=ops, maci=enabled)
  if name == 'late_fusion':
    base = late_fusion.LateFusion(bert_config, m.text_encoder.num_layers, 3 * m.embed_dim,
                                  3 * m.embed_dim, drop(m.out_dropout), dtype, ops)
  else:
    pooling = m.text_encoder.get('pooling', 'auto')
    if pooling == 'auto':
      pooling = bert.sentence_pooling(m.text_encoder.path)
    base = mag_bert.MAGBert(bert_config, spec.aligned, m.text_encoder.num_layers, m.embed_dim,
                            pooling=pooling, out_dropout=drop(m.out_dropout), dtype=dtype,
                            ops=ops)
  return MACI(base, num_classes=spec.num_classes, feature_dims=dims, embed_dim=m.embed_dim,
              cross_dataset=bool(m.cross_dataset), enabled=enabled)


def parameter_counts(config) -> dict:
  """The model of a config with nominal shapes (no data, no weights loaded): parameter counts."""
  configuration.validate(config, check_paths=False)
  spec = nominal_spec(config)
  bert_config = text_encoder_config(config, allow_default=True)
  model = build_model(config, spec, bert_config)
  dims = (bert_config.hidden_size,) + tuple(spec.feature_dims)
  args = example_inputs(2, spec.seq_lens, dims, spec.num_classes)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))['params']
  count = lambda t: int(sum(x.size for x in jax.tree.leaves(t)))
  total, text = count(shapes), count(shapes['text_encoder'])
  return {'params_total': total, 'params_text_encoder': text, 'params_cider': total - text}
