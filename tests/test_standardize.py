"""Audio / vision standardisation with train-split statistics, the validator's scale report and
the one-class collapse warning."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from cider_jax import eval_step, run_state, train
from cider_jax.data import mmsa, standardize, synthetic
from cider_jax.models.cider import CIDer
from cider_jax.spec import ModelSpec
from cider_jax.train_step import INPUT_KEYS, model_inputs
from tests.helpers import tiny
from tests.conftest import make_mmsa


def _split(audio, audio_mask, vision, vision_mask):
  return types.SimpleNamespace(audio=np.asarray(audio, np.float32),
                               audio_mask=np.asarray(audio_mask, np.float32),
                               vision=np.asarray(vision, np.float32),
                               vision_mask=np.asarray(vision_mask, np.float32))


def test_statistics_over_valid_frames_only():
  # audio: 2 examples × 3 frames × 2 dims; valid frames: (0,0), (0,1), (1,0)
  audio = [[[1.0, 5.0], [3.0, 5.0], [1000.0, -1000.0]],
           [[5.0, 5.0], [-7e3, 9e3], [4e4, 1.0]]]
  audio_mask = [[1, 1, 0], [1, 0, 0]]
  vision = [[[2.0], [4.0]], [[0.0], [0.0]]]
  vision_mask = [[1, 1], [0, 0]]                    # the second example has no vision frame
  s = standardize.statistics(_split(audio, audio_mask, vision, vision_mask))
  # dim 0: values 1, 3, 5 → mean 3, population std sqrt(8/3); dim 1: 5, 5, 5 → constant
  np.testing.assert_allclose(s['audio_mean'], [3.0, 5.0], rtol=1e-6)
  np.testing.assert_allclose(s['audio_std'], [np.sqrt(8 / 3), 1.0], rtol=1e-6)
  np.testing.assert_allclose(s['vision_mean'], [3.0], rtol=1e-6)
  np.testing.assert_allclose(s['vision_std'], [1.0], rtol=1e-6)
  assert all(s[k].dtype == np.float32 for k in standardize.KEYS)


def test_identity_statistics_leave_inputs_bit_exact():
  batch = {k: v for k, v in _tiny_inputs(seed=3).items()}
  batch['audio'] = batch['audio'] * 376.0 + 1e-3
  consts = dict(tiny.consts(), **standardize.identity(5, 7))
  out = jax.jit(model_inputs)(batch, consts)
  for k in batch:
    np.testing.assert_array_equal(np.asarray(out[k]), batch[k])


def test_model_inputs_standardise_valid_frames_and_keep_padding():
  batch = _tiny_inputs(seed=1)
  batch['audio'][0, -1] = 123.0                      # a padded frame (mask 0) with a value
  batch['audio_mask'][0, -1] = 0.0
  stats = {'audio_mean': np.arange(5, dtype=np.float32), 'audio_std': np.full(5, 2, np.float32),
           'vision_mean': np.ones(7, np.float32), 'vision_std': np.full(7, 4, np.float32)}
  out = model_inputs(batch, dict(tiny.consts(), **stats))
  a, m = batch['audio'], batch['audio_mask'][..., None] > 0
  np.testing.assert_allclose(out['audio'], np.where(m, (a - np.arange(5)) / 2, a), rtol=1e-6)
  assert float(out['audio'][0, -1, 0]) == 123.0
  v, mv = batch['vision'], batch['vision_mask'][..., None] > 0
  np.testing.assert_allclose(out['vision'], np.where(mv, (v - 1) / 4, v), rtol=1e-6)


_SPEC = ModelSpec(seq_lens=(10, 13, 9), feature_dims=(5, 7), num_classes=3, aligned=False)


def _tiny_inputs(B=6, seed=0):
  return {k: v for k, v in tiny.batch(B, seed, spec=_SPEC).items() if k in INPUT_KEYS}


def _raw_scale(x, mask, scale, shift):
  return np.where(mask[..., None] > 0, x * scale + shift, 0.0).astype(np.float32)


def test_predictions_do_not_depend_on_the_feature_scale():
  """Standardised with its own train statistics, data on another affine scale per dimension
  (×100 + 50 and ×0.01 − 3) gives the model the same inputs, hence the same log-probabilities
  (float32 rounding of the rescaling: 1e-4); with the raw inputs it does not."""
  model = CIDer(tiny.TINY_BERT, 3, False, (48, 5, 7), (10, 13, 9), embed_dim=32, num_heads=4,
                layers=2)
  train_b, test_b = _tiny_inputs(B=16, seed=0), _tiny_inputs(B=6, seed=1)
  scale_a, shift_a = np.linspace(1, 100, 5).astype(np.float32), np.float32(50)
  scale_v, shift_v = np.full(7, 0.01, np.float32), np.float32(-3)

  def rescaled(b):
    return dict(b, audio=_raw_scale(b['audio'], b['audio_mask'], scale_a, shift_a),
                vision=_raw_scale(b['vision'], b['vision_mask'], scale_v, shift_v))

  feats = np.random.RandomState(2).randn(3, 48 + 5 + 7).astype(np.float32) * 0.1
  base = dict(tiny.consts(), cls_feats=jnp.asarray(feats))
  params = model.init(jax.random.PRNGKey(0), _tiny_inputs(B=2),
                      np.zeros((3, 2, 60), np.float32), np.full((2, 3), 1 / 3, np.float32))
  step = eval_step.make_eval_step(model, axis_name=None)

  def logp(train_batch, batch, standardise=True):
    stats = (standardize.statistics(_split(**{k: train_batch[k] for k in (
        'audio', 'audio_mask', 'vision', 'vision_mask')})) if standardise
             else standardize.identity(5, 7))
    return np.asarray(step(params['params'], dict(base, **stats), batch)['logp'])

  same = logp(train_b, test_b)
  np.testing.assert_allclose(logp(rescaled(train_b), rescaled(test_b)), same, atol=1e-4)
  raw = logp(rescaled(train_b), rescaled(test_b), standardise=False)
  assert np.abs(raw - logp(train_b, test_b, standardise=False)).max() > 1e-2


# ------------------------------------------------------------------------------ constants


def _constants_setup(monkeypatch, standardize_on=True):
  """A config and MMSA-like splits (train and test on different scales); prototypes come from
  the features the model is given (recorded)."""
  data = mmsa.splits_from_dict(make_mmsa(sizes=(12, 5, 7), audio_len=30, vision_len=40))
  test = data['test']
  data['test'] = mmsa.Split(**{**test.__dict__,
                               'audio': test.audio * 1000 + 7, 'vision': test.vision - 40})
  config = default.get_config()
  config.data.standardize = standardize_on
  seen = []

  def features(encoder, encoder_vars, split, stats=None):
    seen.append(stats)
    return np.zeros((len(split.text_ids), 4), np.float32)

  monkeypatch.setattr(run_state.proto_lib, 'sample_features', features)
  spec = types.SimpleNamespace(num_classes=3)
  return config, data, spec, seen


def test_constants_hold_train_statistics_and_are_reused(tmp_path, monkeypatch, capsys):
  config, splits, spec, seen = _constants_setup(monkeypatch)
  c = run_state.constants(config, splits, spec, None, None, str(tmp_path))
  want = standardize.statistics(splits['train'])
  for k in standardize.KEYS:
    np.testing.assert_array_equal(c[k], want[k])
  assert seen[0] is not None and np.array_equal(seen[0]['audio_mean'], want['audio_mean'])
  # train only: the test split's scale (×1000 + 7) is nowhere in them
  assert np.abs(c['audio_mean']).max() < 5
  # resuming or evaluating under data.standardize=False: the run's saved statistics are used
  config.data.standardize = False
  again = run_state.constants(config, splits, spec, None, None, str(tmp_path))
  assert len(seen) == 1
  for k in standardize.KEYS:
    np.testing.assert_array_equal(again[k], want[k])
  assert 'trained with data.standardize=True' in capsys.readouterr().out
  for which in (run_state.train_consts, ):
    got = which(again, 30522)
    np.testing.assert_array_equal(got['audio_std'], want['audio_std'])
  got = run_state.eval_consts(again, 30522, 3)
  np.testing.assert_array_equal(got['vision_mean'], want['vision_mean'])


def test_standardize_off_stores_identity(tmp_path, monkeypatch):
  config, splits, spec, _ = _constants_setup(monkeypatch, standardize_on=False)
  c = run_state.constants(config, splits, spec, None, None, str(tmp_path))
  assert standardize.is_identity(c)


def test_run_saved_without_statistics_uses_raw_features(capsys):
  c = run_state.with_feature_stats({'cls_feats': np.zeros((3, 4))}, 5, 20)
  assert standardize.is_identity(c) and c['audio_mean'].shape == (5,)
  assert 'no standardisation statistics' in capsys.readouterr().out


# ------------------------------------------------------------------------------ validator, data


def test_validator_reports_raw_scales():
  data = make_mmsa(sizes=(6, 3, 3))
  for split in data.values():
    split['audio'] = split['audio'] * 100 + 50
  text = mmsa.summarize(mmsa.splits_from_dict(data))
  audio = [l for l in text.splitlines() if l.strip().startswith('audio scale')]
  vision = [l for l in text.splitlines() if l.strip().startswith('vision scale')]
  assert len(audio) == 3 and all('raw scales' in l for l in audio)
  assert len(vision) == 3 and not any('raw scales' in l for l in vision)


def test_scale_summary_flags_mixed_dimension_scales():
  x = np.ones((4, 6, 3), np.float32)
  x[..., 0] = np.random.RandomState(0).randn(4, 6) * 0.01
  x[..., 1] = np.random.RandomState(1).randn(4, 6) * 5.0        # within range, but 500× dim 0
  s = standardize.scale_summary(x, np.ones((4, 6), np.float32))
  assert s['raw'] and s['constant_dims'] == 1 and s['std_ratio'] > 100


def test_synthetic_feature_scale_and_shift():
  cfg = {'seed': 0, 'n_train': 8, 'n_valid': 4, 'n_test': 4, 'text_len': 16, 'audio_len': 10,
         'vision_len': 12, 'audio_dim': 3, 'vision_dim': 4}
  plain = synthetic.generate(cfg)
  raw = synthetic.generate(dict(cfg, feature_scale=100.0, feature_shift=50.0))
  assert synthetic.params_hash(synthetic.synthetic_params(cfg)) != synthetic.params_hash(
      synthetic.synthetic_params(dict(cfg, feature_scale=100.0)))
  for split in ('train', 'test'):
    for m in ('audio', 'vision'):
      n = plain[split][f'{m}_lengths']
      valid = (np.arange(plain[split][m].shape[1])[None] < n[:, None])[..., None]
      np.testing.assert_allclose(raw[split][m], np.where(valid, plain[split][m] * 100 + 50, 0),
                                 rtol=1e-6, atol=1e-4)
      np.testing.assert_array_equal(raw[split]['text_bert'], plain[split]['text_bert'])


# ------------------------------------------------------------------------------ collapse


def _one_class_eval(logp_row):
  def eval_fn(params, consts, feed):
    B = feed['text_ids'].shape[0]
    row = np.asarray(logp_row, np.float32)
    return {'logp': np.tile(row, (B, 1)), 'logp_cf': np.tile(row, (B, 1))}
  return eval_fn


def test_validate_counts_predicted_classes():
  split = mmsa.splits_from_dict(make_mmsa(sizes=(6, 9, 3)))['valid']
  config = default.get_config()
  v = train.validate(_one_class_eval(np.log([0.1, 0.2, 0.7])), None, None, split, config, 0)
  assert v['predicted_classes'] == 1 and v['top_class'] == 2


def test_collapse_warning_after_consecutive_one_class_epochs():
  config = default.get_config()
  config.train.collapse_epochs = 3
  meta = {}
  one, many = {'predicted_classes': 1, 'top_class': 2}, {'predicted_classes': 3, 'top_class': 0}
  seen = [train.collapse_warning(meta, v, config) for v in (one, one, many, one, one, one, one)]
  assert [w is not None for w in seen] == [False, False, False, False, False, True, False]
  assert seen[5].startswith('warning: the model has predicted class 2 for every validation '
                            'example for 3 epochs in a row')
  assert 'data.standardize' in seen[5]
  config.train.collapse_epochs = 0
  assert all(train.collapse_warning({}, one, config) is None for _ in range(5))
