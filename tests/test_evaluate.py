"""Evaluation of a checkpoint: report structure, τ chosen on validation, predictions, errors."""
import json
import os

import numpy as np
import pytest

from cider_jax import checkpoint as ckpt_lib
from cider_jax import evaluate as eval_lib
from cider_jax import metrics, tokens
from cider_jax.data import pipeline
from tests.helpers import runs


def _config(tmp):
  return runs.small_config(tmp)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A workdir holding a (randomly initialised) best checkpoint, then its evaluation."""
  tmp = tmp_path_factory.mktemp('eval')
  config, workdir = _config(tmp), str(tmp / 'run')
  _, report = runs.random_best_run(config, workdir, bias_vocab=lambda splits: {
      'bias_vocab': np.unique(splits['train'].text_ids[:, 1:4]).astype(np.int32)})
  return config, workdir, report


def test_report_has_every_mode_and_rate(run):
  config, workdir, report = run
  on_disk = json.load(open(os.path.join(workdir, 'eval', 'report.json')))
  assert on_disk['tau']['selected_on'] == 'valid'
  assert on_disk['checkpoint']['selected_on'] == 'debiased'     # MACI, train.select_on='auto'
  old = {'config': {'train': {}, 'maci': {'enabled': True}}}    # saved before train.select_on
  assert eval_lib.selected_on(old) == 'factual'
  assert eval_lib.selected_on({'config': {'train': {'select_on': 'auto'},
                                          'maci': {'enabled': False}}}) == 'factual'
  for mode in ('RMFM', 'RMM'):
    m = on_disk['modes'][mode]
    assert m['rates'] == [0.0, 0.5, 1.0]
    for variant in ('factual', 'debiased'):
      assert len(m[variant]['Non0_acc_2']) == 3
      assert set(m['auilc'][variant]) >= {'Acc_3', 'Non0_acc_2', 'Has0_F1'}
  assert set(on_disk['specific_modality']) == {'L', 'A', 'V', 'LA', 'LV', 'AV', 'LAV'}
  assert 'test_oracle' in on_disk
  for f in ('report.csv', 'predictions.npz', 'Non0_acc_2_vs_rate.png'):
    assert os.path.exists(os.path.join(workdir, 'eval', f))


def test_numbers_recompute_from_predictions(run):
  """τ is the validation argmax of the same setting; test numbers follow from predictions.npz."""
  config, workdir, report = run
  z = np.load(os.path.join(workdir, 'eval', 'predictions.npz'))
  taus = metrics.tau_grid(*config.maci.tau_grid)
  for mode in ('RMFM', 'RMM'):
    for i, rate in enumerate((0.0, 0.5, 1.0)):
      v = {k: z[f'valid/{mode}/{rate:.1f}/{k}'] for k in ('labels', 'factual', 'counterfactual')}
      t = {k: z[f'test/{mode}/{rate:.1f}/{k}'] for k in ('labels', 'factual', 'counterfactual')}
      per_tau = metrics.metrics_per_tau(v['factual'], v['counterfactual'], v['labels'],
                                        'binary', taus)['Non0_acc_2']
      tau = report['modes'][mode]['tau'][i]
      assert per_tau[list(taus).index(tau)] == np.nanmax(per_tau)
      assert list(taus).index(tau) == int(np.nanargmax(per_tau))  # ties: smallest τ
      fact = metrics.classification_metrics(t['factual'], t['labels'], 'binary')
      deb = metrics.classification_metrics(t['factual'] - tau * t['counterfactual'],
                                           t['labels'], 'binary')
      assert report['modes'][mode]['factual']['Acc_3'][i] == pytest.approx(fact['Acc_3'])
      assert report['modes'][mode]['debiased']['Acc_3'][i] == pytest.approx(deb['Acc_3'])
  m = report['modes']['RMFM']
  assert m['auilc']['factual']['Acc_3'] == pytest.approx(
      np.trapezoid(m['factual']['Acc_3'], m['rates']))
  # the counterfactual summary: test, first mode, complete input
  t = {k: z[f'test/{config.eval.modes[0]}/0.0/{k}'] for k in ('factual', 'counterfactual')}
  cf = report['maci']['counterfactual']
  assert cf['agreement'] == pytest.approx(np.mean(
      t['factual'].argmax(-1) == t['counterfactual'].argmax(-1)))
  assert cf['cf_class_shares'] == pytest.approx(
      [np.mean(t['counterfactual'].argmax(-1) == c) for c in range(3)])


def test_missing_workdir_is_a_clear_error(tmp_path):
  with pytest.raises(eval_lib.EvaluationError, match='does not exist'):
    eval_lib.evaluate(_config(tmp_path), str(tmp_path / 'nowhere'))


def test_aligned_only_mode_on_unaligned_data(tmp_path):
  c = _config(tmp_path)
  c.eval.modes = ('TMFM',)
  with pytest.raises(eval_lib.EvaluationError, match='word-aligned'):
    eval_lib.evaluate(c, str(tmp_path))


def test_checkpoint_of_another_configuration(run):
  config, workdir, _ = run
  from pathlib import Path
  other = _config(Path(workdir).parent)
  other.task = 'seven'
  with pytest.raises(ckpt_lib.CheckpointError, match='task'):
    eval_lib.evaluate(other, workdir)


def test_predict_new_samples(run):
  """Features of any length are cut or zero-padded to the run's (La, Lv): a row longer than La
  predicts as its first La frames, a shorter one as the La-frame array zero-padded after its
  length; the debiased probabilities are softmax(logp − τ·logp_cf) at the report's τ and the
  labels their argmax; an example alone predicts as in the batch (one example's numbers never
  depend on the others)."""
  import cider_jax
  config, workdir, report = run
  rng = np.random.RandomState(1)
  audio = [rng.randn(7, 5), rng.randn(30, 5)]      # shorter and longer than the run's 20
  vision = [rng.randn(24, 20), rng.randn(3, 20)]
  texts = ['what a wonderful film', 'it was dull']
  out = cider_jax.predict(workdir, texts, audio, vision)
  assert out['tau'] == report['tau']['value']
  pred = cider_jax.Predictor(workdir)
  _, La, Lv = pred.spec.seq_lens
  assert (La, Lv) == (20, 24)
  # the same two examples as (N, T, D) arrays cut / zero-padded by hand, with their lengths
  pad = lambda x, T: np.concatenate([x[:T], np.zeros((max(0, T - len(x)), x.shape[1]))])
  by_hand = pred(texts, np.stack([pad(a, La) for a in audio]),
                 np.stack([pad(v, Lv) for v in vision]), audio_lengths=[7, La],
                 vision_lengths=[Lv, 3])
  for k in ('logp', 'logp_cf'):
    np.testing.assert_allclose(out[k], by_hand[k], rtol=0, atol=1e-6)
  # the cut-off frames do not matter: other values there give the same numbers
  audio2 = [audio[0], np.concatenate([audio[1][:La], 100 + rng.randn(10, 5)])]
  np.testing.assert_allclose(pred(texts, audio2, vision)['logp'], out['logp'], atol=1e-6)
  # the debiased probabilities and labels by formula, in float64
  d = out['logp'].astype(np.float64) - out['tau'] * out['logp_cf'].astype(np.float64)
  want = np.exp(d - d.max(1, keepdims=True))
  want /= want.sum(1, keepdims=True)
  np.testing.assert_allclose(out['probs_debiased'], want, rtol=0, atol=1e-12)
  np.testing.assert_array_equal(out['labels'], want.argmax(1))
  np.testing.assert_allclose(out['probs'], np.exp(out['logp'].astype(np.float64)), atol=1e-12)
  # one example alone: the batch's numbers
  alone = pred(texts[1:], audio[1:], vision[1:])
  np.testing.assert_allclose(alone['logp'], out['logp'][1:], rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match='audio\\[0\\]'):
    cider_jax.predict(workdir, ['x'], [rng.randn(4, 6)], [rng.randn(4, 20)])


def test_predict_equals_the_evaluation_on_raw_features(run):
  """predict standardises new samples with the run's saved train statistics, as the
  evaluation does: its probabilities on the validation split's raw texts and features are the
  evaluation's (predictions.npz, complete input) to float32 rounding."""
  import cider_jax
  config, workdir, _ = run
  valid = pipeline.load_splits(config, workdir)['valid']
  idx = np.arange(6)
  audio = [valid.audio[i, :int(valid.audio_mask[i].sum())] for i in idx]
  vision = [valid.vision[i, :int(valid.vision_mask[i].sum())] for i in idx]
  out = cider_jax.predict(workdir, list(valid.raw_text[idx]), audio, vision, tau=0.0)
  with np.load(os.path.join(workdir, 'eval', 'predictions.npz')) as z:
    want = np.exp(z['valid/RMFM/0.0/factual'][idx])
  np.testing.assert_allclose(out['probs'], want, atol=1e-5)


def test_bias_vocabulary_of_other_maci_settings(run, tmp_path, capsys):
  """constants.npz records top_k / cv_threshold: other settings are recomputed from the train
  split (launch/evaluate.py) or refused where no train split is at hand (predict)."""
  import shutil
  config, workdir, _ = run
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  path = os.path.join(copy, 'constants.npz')
  with np.load(path) as z:
    c = {k: z[k] for k in z.files}
  c.update(maci_top_k=np.asarray(5, np.int64), maci_cv_threshold=np.asarray(0.1, np.float32),
           bias_vocab=np.array([1000, 2000], np.int32))
  np.savez(path, **c)
  with pytest.raises(eval_lib.EvaluationError, match='maci.top_k=5'):
    eval_lib.restore_best(config, copy)
  splits = pipeline.load_splits(config, copy)
  consts = eval_lib.restore_best(config, copy, splits['train'])[2]
  assert f'recomputed for maci.top_k={config.maci.top_k}' in capsys.readouterr().out
  from cider_jax import counterfactual
  tr = splits['train']
  want = counterfactual.bias_vocabulary(tr.text_ids, tr.labels(config.task), config.task,
                                        config.maci.top_k, config.maci.cv_threshold)
  table = np.asarray(consts['bias_table'])
  specials = {i for i in tokens.BERT.ids if i < table.size}
  assert set(np.flatnonzero(table > 0).tolist()) == set(np.asarray(want).tolist()) | specials
