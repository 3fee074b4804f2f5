"""A run's state: the train state and the constants derived from the train split.

Training, evaluation and prediction build them here:

  special = special_tokens(config)                                 # the text encoder's [CLS] …
  c = constants(config, splits, spec, encoder, encoder_vars, workdir, special)
  setup = init_state(config, spec, bert_config, train_consts(c, vocab_size, special))
  restored = restore_params(ckpts, 'best', config, spec, bert_config, consts)  # no optimizer

The constants of the train split (cached in <workdir>/constants.npz) are the audio / vision
standardisation statistics (`audio_mean`, … of data/standardize.py; identity under
data.standardize=False), the class prototypes `cls_feats` (of the standardised features), the
label prior `prior` and the bias vocabulary `bias_vocab` with the config.maci settings it was
built with; `train_consts` / `eval_consts` turn them into the `consts` of the
train step and of the eval step.
"""
import time
import zipfile
import zlib
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils

from cider_jax import checkpoint as ckpt_lib
from cider_jax import counterfactual, optim, tokens
from cider_jax import prototypes as proto_lib
from cider_jax import spec as spec_lib
from cider_jax.data import standardize
from cider_jax.data.validate import DataError
from cider_jax.models import bert
from cider_jax.models.cider import CIDer, example_inputs
from cider_jax.train_step import TrainState


class TrainSetup(NamedTuple):
  """What training starts from (`init_state`)."""
  model: CIDer
  tx: optax.GradientTransformation
  labels: Any          # the optimizer's group label of every parameter (a params-like pytree)
  state: TrainState


class RestoredParams(NamedTuple):
  """The parameters of a checkpoint (`restore_params`)."""
  model: CIDer
  params: Any          # numpy arrays
  step: int
  meta: dict


# ------------------------------------------------------------------------------ train state

def init_state(config, spec, bert_config, consts, encoder_params=None) -> TrainSetup:
  """Fresh training setup: random CIDer weights, the pretrained text encoder if given."""
  model = spec_lib.build_model(config, spec, bert_config)
  return TrainSetup(model, *_new_state(model, config, spec, bert_config, consts, encoder_params))


def _new_state(model, config, spec, bert_config, consts, encoder_params):
  """(tx, labels, TrainState) of a fresh run of `model`."""
  dims = (bert_config.hidden_size,) + tuple(spec.feature_dims)
  rng = jax.random.PRNGKey(config.train.seed)
  params = model.init(jax.random.fold_in(rng, 1), *example_inputs(2, spec.seq_lens, dims,
                                                                  spec.num_classes))['params']
  if encoder_params is not None:
    params = dict(params, text_encoder=encoder_params)
  tx, labels = optim.make_optimizer(config.optim, params, spec.aligned)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.fold_in(rng, 2), consts=consts)
  return tx, labels, state


def abstract_state(config, spec, bert_config, consts) -> Tuple[CIDer, TrainState]:
  """The model and the TrainState `init_state` builds, as jax.ShapeDtypeStructs (`jax.eval_shape`:
  nothing is computed or allocated). consts: the train constants, arrays or ShapeDtypeStructs."""
  model = spec_lib.build_model(config, spec, bert_config)
  state = jax.eval_shape(lambda c: _new_state(model, config, spec, bert_config, c, None)[2],
                         consts)
  return model, state


def restore_params(ckpts: ckpt_lib.Checkpoints, which: str, config, spec, bert_config,
                   consts) -> Optional[RestoredParams]:
  """The model, parameters and step of the newest readable checkpoint of a series, or None.

  Only the parameters and the step are read and allocated: the target is `abstract_state`, the
  optimizer moments, RNG and constants are skipped. consts: the train constants or their
  ShapeDtypeStructs (their structure makes the target's; they are not read).
  """
  model, target = abstract_state(config, spec, bert_config, consts)
  restored = ckpts.restore(which, target, config, fields=('step', 'params'))
  if restored is None:
    return None
  state, meta = restored
  return RestoredParams(model, state.params, int(state.step), meta)


# ------------------------------------------------------------------------------ constants

def special_tokens(config) -> tokens.SpecialTokens:
  """The special tokens of model.text_encoder.path's vocabulary (vocab.txt / tokenizer.json);
  bert-base-uncased's where the folder has no tokenizer files."""
  try:
    return tokens.from_tokenizer_dir(bert.resolve_path(config.model.text_encoder.path))
  except FileNotFoundError:
    return tokens.BERT


def constants(config, splits, spec, encoder, encoder_vars, workdir,
              special: tokens.SpecialTokens = tokens.BERT) -> dict:
  """Prototypes, prior and bias vocabulary of the train split, cached in <workdir>/constants.npz.

  Every process computes them the same way (or reads the cache); process 0 writes the cache.
  special: the text encoder's special tokens, which are never bias words.
  """
  path = epath.Path(workdir) / 'constants.npz'
  cached = path.exists()
  if jax.process_count() > 1:
    # every process has looked before process 0 may write: all read, or all compute
    multihost_utils.sync_global_devices('cider_jax constants.npz')
  if cached:
    train = splits['train']
    c = with_feature_stats(read_constants(path), train.audio.shape[-1],
                           train.vision.shape[-1])
    _note_standardize_setting(config, c)
    return with_bias_vocab(config, c, train, special)
  train = splits['train']
  labels = train.labels(config.task)
  t0 = time.time()
  stats = feature_stats(config, train)
  feats = proto_lib.sample_features(encoder, encoder_vars, train, stats=stats)
  cls_feats, prior = proto_lib.class_prototypes(feats, labels, spec.num_classes)
  out = {'cls_feats': cls_feats, 'prior': prior, **stats,
         **bias_vocab(config, train, special)}
  if ckpt_lib.is_writer():
    ckpt_lib.write_npz(path, out)
  what = ('standardisation statistics, ' if not standardize.is_identity(stats) else '')
  print(f'{what}prototypes, prior and {len(out["bias_vocab"])} bias words from {len(labels)} '
        f'train samples ({time.time() - t0:.1f} s) -> {path}', flush=True)
  return out


# the arrays every constants.npz holds (standardisation statistics and the config.maci
# settings may be absent: older runs)
CONSTANT_KEYS = ('cls_feats', 'prior', 'bias_vocab')


def read_constants(path) -> dict:
  """The arrays of a run's constants.npz at `path` (local or gs://). A damaged file (truncated,
  not an .npz, without the arrays of CONSTANT_KEYS) raises CheckpointError naming it and what
  to do; a missing one FileNotFoundError."""
  remedy = ('delete it: python launch/train.py with the run\'s --config and --workdir computes '
            'it again from the train split (the checkpoints are kept)')
  try:
    c = ckpt_lib.read_npz(path)
  except (ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
    detail = ' '.join(f'{type(e).__name__}: {e}'.split())[:120]
    raise ckpt_lib.CheckpointError(f'{path} is damaged ({detail}); {remedy}') from e
  missing = [k for k in CONSTANT_KEYS if k not in c]
  if missing:
    raise ckpt_lib.CheckpointError(f'{path} is damaged: it has no {", ".join(missing)}; '
                                   f'{remedy}')
  return c


def feature_stats(config, train_split) -> dict:
  """The audio / vision standardisation statistics of the train split under
  config.data.standardize (identity when it is off)."""
  if config.data.get('standardize', False):
    return standardize.statistics(train_split)
  return standardize.identity(train_split.audio.shape[-1], train_split.vision.shape[-1])


def with_feature_stats(c, audio_dim: int, vision_dim: int) -> dict:
  """Cached constants `c` with their standardisation statistics; a run saved without them
  (before data.standardize existed) used its features as they are: identity."""
  if all(k in c for k in standardize.KEYS):
    return c
  print('constants.npz holds no standardisation statistics: the features are used as they '
        'are (data.standardize=False)', flush=True)
  return {**c, **standardize.identity(audio_dim, vision_dim)}


def _stats_consts(c) -> dict:
  return {k: jnp.asarray(c[k]) for k in standardize.KEYS if k in c}


def _note_standardize_setting(config, c) -> None:
  saved = not standardize.is_identity(c)
  if saved != bool(config.data.get('standardize', False)):
    print(f'note: this run was trained with data.standardize={saved}; its saved statistics are '
          'used (constants.npz)', flush=True)


def _maci_settings(config) -> dict:
  return {'maci_top_k': np.asarray(config.maci.top_k, np.int64),
          'maci_cv_threshold': np.asarray(config.maci.cv_threshold, np.float32)}


def bias_vocab(config, train_split, special: tokens.SpecialTokens = tokens.BERT) -> dict:
  """{'bias_vocab', 'maci_top_k', 'maci_cv_threshold'} of the train split under config.maci."""
  vocab = counterfactual.bias_vocabulary(train_split.text_ids, train_split.labels(config.task),
                                         config.task, top_k=config.maci.top_k,
                                         cv_threshold=config.maci.cv_threshold, special=special)
  return {'bias_vocab': np.asarray(vocab, np.int32), **_maci_settings(config)}


def bias_vocab_matches(config, c) -> bool:
  """Whether cached constants `c` hold the bias vocabulary of config.maci (top_k, cv_threshold)."""
  want = _maci_settings(config)
  return all(k in c and np.array_equal(np.asarray(c[k]), want[k]) for k in want)


def with_bias_vocab(config, c, train_split, special: tokens.SpecialTokens = tokens.BERT) -> dict:
  """Cached constants `c`, their bias vocabulary recomputed when config.maci differs from the
  settings it was built with (the vocabulary depends on the train split and config.maci only;
  the model does not, so a different maci.top_k / cv_threshold is legitimate at evaluation)."""
  if bias_vocab_matches(config, c):
    return c
  old = (f'top_k={int(c["maci_top_k"])}, cv_threshold={float(c["maci_cv_threshold"]):g}'
         if 'maci_top_k' in c and 'maci_cv_threshold' in c else 'unrecorded settings')
  c = {**c, **bias_vocab(config, train_split, special)}
  print(f'bias vocabulary recomputed for maci.top_k={config.maci.top_k}, '
        f'maci.cv_threshold={config.maci.cv_threshold:g} (constants.npz has {old}): '
        f'{len(c["bias_vocab"])} bias words', flush=True)
  return c


def train_consts(c, vocab_size: int, special: tokens.SpecialTokens = tokens.BERT) -> dict:
  """The train step's constants: the class prototypes, the prior, the bias-word table and the
  audio / vision standardisation statistics."""
  return {'cls_feats': jnp.asarray(c['cls_feats']), 'cls_probs': jnp.asarray(c['prior']),
          'bias_table': counterfactual.bias_lookup_table(c['bias_vocab'], vocab_size, special),
          **_stats_consts(c)}


def eval_consts(c, vocab_size: int, num_classes: int,
                special: tokens.SpecialTokens = tokens.BERT) -> dict:
  """The eval step's constants: the mean prototype for every class, a uniform prior, the
  bias-word table (`prototypes.eval_constants`) and the standardisation statistics."""
  feats, prior = proto_lib.eval_constants(c['cls_feats'], num_classes)
  return {'cls_feats': feats, 'cls_probs': prior,
          'bias_table': counterfactual.bias_lookup_table(c['bias_vocab'], vocab_size, special),
          **_stats_consts(c)}


def check_token_ids(splits, vocab_size: int) -> None:
  """Token ids must index the text encoder's vocabulary (checked before any compilation)."""
  for name, split in splits.items():
    bad = np.argwhere(split.text_ids >= vocab_size)
    if bad.size:
      i, j = bad[0]
      raise DataError(f'split {name!r}, field text_bert (token ids), example {i}: id '
                      f'{split.text_ids[i, j]} at position {j} is beyond the text encoder\'s '
                      f'vocabulary of {vocab_size}; was the text tokenised for another BERT?',
                      split=name, field='text_bert', index=int(i))
