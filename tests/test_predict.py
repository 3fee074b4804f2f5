"""The Predictor (load once, one program per batch-size bucket) and `python -m cider_jax.predict`.

Reference values are the evaluation's own predictions (eval/predictions.npz, complete input):
the Predictor must reproduce them to float32 rounding (1e-5) whatever the batch it runs in.
"""
import csv
import importlib
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from cider_jax import inference
from tests.helpers import runs

ATOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(tmp):
  return runs.small_config(tmp, modes=('RMFM',), rates=(0.0,), eval_batch_size=40)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A workdir with a (randomly initialised) best checkpoint and its evaluation; the
  validation split; a Predictor of the workdir with buckets 1, 8 and 32."""
  tmp = tmp_path_factory.mktemp('predict')
  config, workdir = _config(tmp), str(tmp / 'run')
  splits, report = runs.random_best_run(config, workdir)
  with np.load(os.path.join(workdir, 'eval', 'predictions.npz')) as z:
    want = {k: z[f'valid/RMFM/0.0/{k}'] for k in ('factual', 'counterfactual')}
  predictor = inference.Predictor(workdir, buckets=(1, 8, 32))
  return {'workdir': workdir, 'valid': splits['valid'], 'want': want,
          'tau': report['tau']['value'], 'predictor': predictor, 'tmp': tmp}


def _rows(split, idx):
  """Predictor arguments for examples `idx` of a split, as MMSA token rows and raw frames."""
  text_bert = np.stack([split.text_ids, split.text_mask, split.text_segments], 1)[idx]
  return dict(text_bert=text_bert, audio=split.audio[idx], vision=split.vision[idx],
              audio_lengths=split.audio_mask[idx].sum(1).astype(int),
              vision_lengths=split.vision_mask[idx].sum(1).astype(int))


def test_bucket_sizes():
  b = (1, 8, 64, 256)
  assert inference.bucket_sizes(0, b) == []
  assert inference.bucket_sizes(1, b) == [1]
  assert inference.bucket_sizes(7, b) == [8]
  assert inference.bucket_sizes(9, b) == [64]
  assert inference.bucket_sizes(256, b) == [256]
  assert inference.bucket_sizes(300, b) == [256, 64]
  assert inference.bucket_sizes(600, b) == [256, 256, 256]


def test_equals_the_evaluation(run):
  """Every validation example (40: buckets 32 + 8): factual and counterfactual log-probs as in
  predictions.npz; debiased = softmax(y − τ·y_cf) with the report's τ; labels its argmax."""
  p, want = run['predictor'], run['want']
  out = p(**_rows(run['valid'], np.arange(40)))
  assert p.tau == run['tau'] and p.tau_source == 'report'
  np.testing.assert_allclose(out['logp'], want['factual'], atol=ATOL)
  np.testing.assert_allclose(out['logp_cf'], want['counterfactual'], atol=ATOL)
  np.testing.assert_allclose(out['probs'], np.exp(want['factual']), atol=ATOL)
  z = want['factual'].astype(np.float64) - p.tau * want['counterfactual']
  soft = np.exp(z - z.max(1, keepdims=True))
  np.testing.assert_allclose(out['probs_debiased'], soft / soft.sum(1, keepdims=True), atol=ATOL)
  np.testing.assert_array_equal(out['labels'], z.argmax(1))
  np.testing.assert_array_equal(out['labels_factual'], want['factual'].argmax(1))


def test_debiased_at_a_given_tau_equals_the_formula(run):
  """The report's τ may be 0 on a random model (debiased = factual): at τ 1.3 the debiased
  probabilities differ from the factual ones and are softmax(y − 1.3·y_cf) of the evaluation's
  log-probabilities."""
  p = inference.Predictor(run['workdir'], tau=1.3, buckets=(8, 32))
  assert p.tau == 1.3
  want = run['want']
  out = p(**_rows(run['valid'], np.arange(40)))
  z = want['factual'].astype(np.float64) - 1.3 * want['counterfactual']
  soft = np.exp(z - z.max(1, keepdims=True))
  expected = soft / soft.sum(1, keepdims=True)
  assert np.abs(expected - np.exp(want['factual'])).max() > 100 * ATOL  # the check has teeth
  np.testing.assert_allclose(out['probs_debiased'], expected, atol=ATOL)
  np.testing.assert_array_equal(out['labels'], z.argmax(1))


def test_bucketing_1_7_and_300(run):
  """1, 7 and 300 examples run in the padded sizes 1, 8 and 9×32 + 32, compiled once each,
  and every example gets the evaluation's value wherever it sits in a padded batch."""
  p, want, valid = run['predictor'], run['want'], run['valid']
  for n in (1, 7, 300, 1):
    idx = (np.arange(n) * 7 + 3) % 40
    out = p(**_rows(valid, idx))
    assert out['logp'].shape == (n, 3)
    np.testing.assert_allclose(out['logp'], want['factual'][idx], atol=ATOL)
    np.testing.assert_allclose(out['logp_cf'], want['counterfactual'][idx], atol=ATOL)
  assert p.compiled_buckets == (1, 8, 32)


def test_bad_rows_are_reported_by_row(run):
  p, valid = run['predictor'], run['valid']
  rng = np.random.RandomState(2)
  texts = ['fine', 'also fine', '   ', 'good', 'good too']
  audio = [rng.randn(6, 6), rng.randn(9, 5), rng.randn(4, 5), np.zeros((0, 5)), rng.randn(3, 5)]
  vision = [rng.randn(5, 20), rng.randn(5, 20), rng.randn(5, 20), rng.randn(5, 20),
            rng.randn(30, 20)]
  vision[1][2, 7] = np.nan
  inputs, bad = p.prepare(texts, audio, vision)
  assert [(b.row, b.field) for b in bad] == [(0, 'audio'), (1, 'vision'), (2, 'text'),
                                              (3, 'audio')]
  assert 'expected (frames, 5) features, got (6, 6)' in bad[0].problem
  assert 'NaN' in bad[1].problem and 'empty text' in bad[2].problem
  assert inputs['vision_mask'][4].sum() == 24 and inputs['audio_mask'][4].sum() == 3
  with pytest.raises(ValueError, match=r'audio\[0\]: .*\(and 3 more bad rows\)'):
    p(texts, audio, vision)
  # token rows: too long for the run's 12 tokens, nothing between [CLS] and [SEP]
  rows = _rows(valid, np.arange(2))
  tb = np.zeros((2, 3, 16))
  tb[0, 0, :14], tb[0, 1, :14] = 2000, 1
  tb[1, 0, :2], tb[1, 1, :2] = (101, 102), 1
  _, bad = p.prepare(text_bert=tb, audio=rows['audio'], vision=rows['vision'])
  assert [(b.row, b.field) for b in bad] == [(0, 'text'), (1, 'text')]
  assert 'at most 12' in bad[0].problem and 'empty' in bad[1].problem


def _pickle_input(run, path, n=10):
  """The first n validation examples as an MMSA pickle {'test': split}; example 3 has a NaN
  vision frame."""
  v, idx = run['valid'], np.arange(n)
  rows = _rows(v, idx)
  vision = rows['vision'].copy()
  vision[3, 0, 1] = np.nan
  split = {'text_bert': rows['text_bert'].astype(np.float32), 'audio': rows['audio'],
           'vision': vision, 'audio_lengths': rows['audio_lengths'],
           'vision_lengths': rows['vision_lengths'], 'id': np.array(v.ids[idx], dtype=object),
           'raw_text': np.array(v.raw_text[idx], dtype=object)}
  with open(path, 'wb') as f:
    pickle.dump({'test': split}, f)


def _read_csv(path):
  with open(path, newline='', encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  names = ('negative', 'neutral', 'positive')
  probs = np.array([[float(r[f'factual_{c}']) for c in names] for r in rows])
  return rows, probs


def test_command_on_a_pickle(run, tmp_path):
  """Bad example 3 stops the run (nothing written) or is skipped; the others' rows hold the
  evaluation's probabilities (6 decimals)."""
  cli = importlib.import_module('cider_jax.predict')
  p, want, valid = run['predictor'], run['want'], run['valid']
  src, out, log = str(tmp_path / 'in.pkl'), str(tmp_path / 'out.csv'), tmp_path / 'log.txt'
  _pickle_input(run, src)
  with open(log, 'w') as f, pytest.raises(cli.InputError, match='1 bad row'):
    cli.predict_file(p, src, out, log=f)
  assert not os.path.exists(out)
  assert f'test example 3 (id {valid.ids[3]}): vision: NaN' in log.read_text()
  with open(log, 'w') as f:
    result = cli.predict_file(p, src, out, on_bad_rows='skip', log=f)
  assert result['written'] == 9
  rows, probs = _read_csv(out)
  keep = [0, 1, 2, 4, 5, 6, 7, 8, 9]
  assert [r['id'] for r in rows] == [str(valid.ids[i]) for i in keep]
  assert [r['text'] for r in rows] == [str(valid.raw_text[i]) for i in keep]
  np.testing.assert_allclose(probs, np.exp(want['factual'][keep]), atol=1e-6)
  assert [r['label_factual'] for r in rows] == [p.class_names[k]
                                                for k in want['factual'][keep].argmax(1)]
  with pytest.raises(cli.InputError, match="no split 'valid'"):
    cli.predict_file(p, src, out, split='valid')


def test_command_on_a_csv(run, tmp_path):
  """Texts with per-example .npy files: a missing file and an empty text are bad rows; the
  good rows, tokenised here from the raw text, give the evaluation's probabilities."""
  cli = importlib.import_module('cider_jax.predict')
  p, want, valid = run['predictor'], run['want'], run['valid']
  lines = []
  for i in range(4):
    for m in ('audio', 'vision'):
      x = getattr(valid, m)[i, :int(getattr(valid, f'{m}_mask')[i].sum())]
      np.save(tmp_path / f'{m}{i}.npy', x)
    lines.append({'id': f'clip{i}', 'text': valid.raw_text[i], 'audio': f'audio{i}.npy',
                  'vision': f'vision{i}.npy'})
  lines[1]['audio'] = 'nowhere.npy'
  lines[2]['text'] = ''
  src, out = tmp_path / 'in.csv', str(tmp_path / 'out.csv')
  with open(src, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=['id', 'text', 'audio', 'vision'])
    w.writeheader()
    w.writerows(lines)
  with open(tmp_path / 'log.txt', 'w') as f:
    result = cli.predict_file(p, str(src), out, on_bad_rows='skip', log=f)
  log = (tmp_path / 'log.txt').read_text()
  assert 'line 3 (id clip1): audio: cannot read nowhere.npy' in log
  assert 'line 4 (id clip2): text: empty text' in log
  assert result['written'] == 2
  rows, probs = _read_csv(out)
  assert [r['id'] for r in rows] == ['clip0', 'clip3']
  np.testing.assert_allclose(probs, np.exp(want['factual'][[0, 3]]), atol=1e-6)


def test_predict_function_and_command_module(run):
  """`cider_jax.predict(...)` is the one-call function before and after the command's module
  is imported (the module is callable); `python -m cider_jax.predict` is the command."""
  import cider_jax
  cli = importlib.import_module('cider_jax.predict')
  assert cider_jax.predict is cli and callable(cli)
  v = run['valid']
  audio = [v.audio[i, :int(v.audio_mask[i].sum())] for i in range(2)]
  vision = [v.vision[i, :int(v.vision_mask[i].sum())] for i in range(2)]
  out = cider_jax.predict(run['workdir'], list(v.raw_text[:2]), audio, vision)
  np.testing.assert_allclose(out['probs'], np.exp(run['want']['factual'][:2]), atol=ATOL)
  assert out['tau'] == run['tau']
  cli = importlib.import_module('cider_jax.predict')
  assert cli.main([run['workdir'], '--input', '/nowhere/x.pkl', '--output', 'o.csv']) == 1
  help_text = subprocess.run([sys.executable, '-m', 'cider_jax.predict', '--help'], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
  assert 'MMSA pickle' in help_text and '--on_bad_rows' in help_text


@pytest.mark.slow
def test_command_in_a_fresh_process(run, tmp_path):
  """The whole command, as a user runs it: bad row listed and exit 1, then skipped."""
  src, out = str(tmp_path / 'in.pkl'), str(tmp_path / 'out.csv')
  _pickle_input(run, src)
  cmd = [sys.executable, '-m', 'cider_jax.predict', run['workdir'], '--input', src, '--output',
         out]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 1 and 'error: ' in r.stderr and 'vision: NaN' in r.stderr
  assert not os.path.exists(out)
  r = subprocess.run(cmd + ['--on_bad_rows=skip'], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  rows, probs = _read_csv(out)
  keep = [0, 1, 2, 4, 5, 6, 7, 8, 9]
  np.testing.assert_allclose(probs, np.exp(run['want']['factual'][keep]), atol=1e-6)
