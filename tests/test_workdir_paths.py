"""Workdirs on Cloud Storage: every workdir file goes through etils.epath, gs:// URIs stay URIs.

A fake gs:// filesystem (etils.epath.testing.mock_epath) maps gs://BUCKET/PATH to a local folder
and records every operation; the tests run from an empty current directory, so a URI mistaken
for a local path (os.path.abspath('gs://b/x') == '<cwd>/gs:/b/x') would show up there.
"""
import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import gpath, testing

from cider_jax import checkpoint as ckpt_lib
from cider_jax import evaluate as eval_lib
from cider_jax import run_state, train
from tests.helpers import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ('open', 'exists', 'isdir', 'listdir', 'glob', 'makedirs', 'mkdir', 'remove', 'rmtree',
       'stat')


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """(bucket folder, [(op, gs:// path, open mode)]) while gs:// paths are faked locally."""
  store = tmp_path / 'store'
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  calls = []

  def wrap(op):
    def fn(original, path, *args, **kwargs):
      path = os.fspath(path)
      if path.startswith('gs://'):
        calls.append((op, path, args[0] if op == 'open' else None))
        path = str(store / path[len('gs://'):])
        if op == 'open' and 'r' not in args[0]:  # objects need no parent folder
          os.makedirs(os.path.dirname(path), exist_ok=True)
      return original(path, *args, **kwargs)
    return fn

  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)  # the gs:// backend is mocked
  monkeypatch.chdir(cwd)
  with testing.mock_epath(**{op: wrap(op) for op in OPS}):
    yield store, calls
  assert os.listdir(cwd) == [], 'a gs:// path was written as a local path'


@pytest.fixture
def process(monkeypatch):
  """process(i): jax.process_index() returns i from now on."""
  return lambda i: monkeypatch.setattr(jax, 'process_index', lambda: i)


def test_checkpoint_manager_gets_the_gs_uri(monkeypatch, tmp_path):
  dirs = []

  class Manager:
    def __init__(self, directory, options=None):
      dirs.append(os.fspath(directory))

  monkeypatch.setattr(ckpt_lib.ocp, 'CheckpointManager', Manager)
  ck = ckpt_lib.Checkpoints('gs://bucket/runs/a')
  assert dirs == ['gs://bucket/runs/a/checkpoints/latest', 'gs://bucket/runs/a/checkpoints/best']
  assert ck.root == 'gs://bucket/runs/a/checkpoints'
  dirs.clear()
  monkeypatch.chdir(tmp_path)
  ckpt_lib.Checkpoints('runs/a')  # a relative local path still becomes absolute
  assert dirs == [os.path.join(os.path.realpath(tmp_path), 'runs/a/checkpoints', s)
                  for s in ('latest', 'best')]
  assert ckpt_lib.is_local('runs/a') and not ckpt_lib.is_local('gs://bucket/runs/a')


def test_npz_and_figure_round_trip_on_gs(gcs):
  store, calls = gcs
  arrays = {'a': np.arange(6, dtype=np.float32).reshape(2, 3), 'b/c': np.array([1, 2], np.int32)}
  for compressed in (False, True):
    ckpt_lib.write_npz(f'gs://bucket/run/x{int(compressed)}.npz', arrays, compressed=compressed)
    back = ckpt_lib.read_npz(f'gs://bucket/run/x{int(compressed)}.npz')
    assert back.keys() == arrays.keys()
    for k in arrays:
      np.testing.assert_array_equal(back[k], arrays[k])
      assert back[k].dtype == arrays[k].dtype
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots()
  ax.plot([0, 1], [1, 0])
  ckpt_lib.write_figure(fig, epath.Path('gs://bucket/run') / 'f.png', dpi=50)
  plt.close(fig)
  assert (store / 'bucket/run/f.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert sorted(os.listdir(store / 'bucket/run')) == ['f.png', 'x0.npz', 'x1.npz']
  assert ('open', 'gs://bucket/run/f.png', 'wb') in calls


def _fake_train_split(n=40):
  b = tiny.batch(n, seed=3)
  return types.SimpleNamespace(text_ids=b['text_ids'], labels=lambda task: b['label'],
                               **{k: b[k] for k in ('audio', 'audio_mask', 'vision',
                                                    'vision_mask')})


def test_constants_written_by_process_0_only_and_read_back(gcs, process, monkeypatch):
  store, calls = gcs
  computed = []

  def features(encoder, encoder_vars, split, stats=None):
    computed.append(1)
    return np.random.RandomState(0).randn(len(split.text_ids), 73).astype(np.float32)

  monkeypatch.setattr(run_state.proto_lib, 'sample_features', features)
  config, splits, workdir = tiny.config(), {'train': _fake_train_split()}, 'gs://bucket/run'
  target = store / 'bucket/run/constants.npz'
  process(1)
  c1 = run_state.constants(config, splits, tiny.SPEC, None, None, workdir)
  assert len(computed) == 1 and not target.exists()
  process(0)
  c0 = run_state.constants(config, splits, tiny.SPEC, None, None, workdir)
  assert len(computed) == 2 and target.exists()
  cached = run_state.constants(config, splits, tiny.SPEC, None, None, workdir)
  assert len(computed) == 2  # read from gs://bucket/run/constants.npz, not recomputed
  for c in (c1, cached):
    assert c.keys() == {'cls_feats', 'prior', 'bias_vocab', 'maci_top_k', 'maci_cv_threshold',
                        'audio_mean', 'audio_std', 'vision_mean', 'vision_std'}
    for k in c:
      np.testing.assert_array_equal(c[k], c0[k])
  assert ('open', 'gs://bucket/run/constants.npz', 'rb') in calls


def test_metrics_log_on_gs_rewrites_instead_of_appending(gcs, process):
  store, calls = gcs
  path = epath.Path('gs://bucket/run/metrics.jsonl')
  with train.MetricsLog(path) as log:
    log.append({'step': 1, 'loss': 0.5})
    log.append({'step': 2, 'loss': 0.25})
    log.flush()
    log.append({'epoch': 1, 'step': 2, 'valid': {'Acc_3': 0.5}})
  with train.MetricsLog(path) as log:  # a resumed run adds to the same file
    log.append({'step': 3, 'loss': 0.125})
  lines = (store / 'bucket/run/metrics.jsonl').read_text().splitlines()
  assert [json.loads(x)['step'] for x in lines] == [1, 2, 2, 3]
  modes = [m for op, p, m in calls if op == 'open']
  assert modes and not any('a' in m for m in modes), modes  # object stores cannot append
  process(1)
  with train.MetricsLog('gs://bucket/run/other.jsonl') as log:
    log.append({'step': 1, 'loss': 0.5})
  assert not (store / 'bucket/run/other.jsonl').exists()


def test_metrics_log_on_a_local_disk_appends_at_once(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1}\n')
  log = train.MetricsLog(str(path))
  log.append({'step': 2})
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n'  # on disk before any flush


def test_training_curves_from_gs(gcs):
  store, _ = gcs
  (store / 'bucket/run').mkdir(parents=True)
  (store / 'bucket/run/metrics.jsonl').write_text(
      '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
      '{"epoch": 1, "step": 2, "valid": {"Acc_3": 0.5, "Non0_acc_2": 0.6}}\n')
  train._plot_curves('gs://bucket/run/metrics.jsonl',
                     epath.Path('gs://bucket/run') / 'training_curves.png')
  assert (store / 'bucket/run/training_curves.png').read_bytes()[:4] == b'\x89PNG'


def _report_rows_preds():
  rng = np.random.RandomState(0)
  rates = [0.0, 1.0]
  curves = {'Non0_acc_2': [0.6, 0.5], 'Acc_3': [0.5, float('nan')]}
  report = {'task': 'binary', 'main_metric': 'Non0_acc_2', 'tau': {'value': 0.1},
            'modes': {'RMFM': {'rates': rates, 'factual': curves, 'debiased': curves}}}
  rows = [{'split': 'test', 'mode': 'RMFM', 'rate': r, 'Acc_3': 0.5} for r in rates]
  preds = {(s, 'modes', 'RMFM', r): {'labels': rng.randint(0, 3, 4),
                                     'factual': rng.randn(4, 3), 'counterfactual': rng.randn(4, 3)}
           for s in ('valid', 'test') for r in rates}
  return report, rows, preds


def test_evaluation_outputs_on_gs(gcs, process):
  store, _ = gcs
  report, rows, preds = _report_rows_preds()
  eval_lib.write_outputs(epath.Path('gs://bucket/run') / 'eval', report, rows, preds)
  out = store / 'bucket/run/eval'
  assert sorted(os.listdir(out)) == ['Acc_3_vs_rate.png', 'Non0_acc_2_vs_rate.png',
                                     'predictions.npz', 'report.csv', 'report.json']
  on_disk = json.loads((out / 'report.json').read_text())
  assert on_disk['modes']['RMFM']['factual']['Acc_3'] == [0.5, None]  # NaN -> null
  assert (out / 'report.csv').read_bytes().startswith(b'split,mode,rate,Acc_3\r\ntest,RMFM,0.0,')
  z = ckpt_lib.read_npz('gs://bucket/run/eval/predictions.npz')
  np.testing.assert_array_equal(z['test/RMFM/1.0/factual'], preds[('test', 'modes', 'RMFM',
                                                                   1.0)]['factual'])
  process(1)
  eval_lib.write_outputs('gs://bucket/run/eval1', report, rows, preds)
  assert not (store / 'bucket/run/eval1').exists()


def test_evaluation_looks_into_the_gs_workdir(gcs, monkeypatch):
  store, calls = gcs
  (store / 'bucket/run').mkdir(parents=True)
  with pytest.raises(eval_lib.EvaluationError,
                     match='gs://bucket/run/constants.npz is missing'):
    eval_lib.restore_best(tiny.config(), 'gs://bucket/run')
  with pytest.raises(eval_lib.EvaluationError, match='does not exist'):
    eval_lib.restore_best(tiny.config(), 'gs://bucket/elsewhere')

  class NoCheckpoints:
    def __init__(self, workdir):
      self.root = f'{workdir}/checkpoints'

    def read_meta(self, which, step=None, required=()):
      return None

  monkeypatch.setattr(eval_lib.ckpt_lib, 'Checkpoints', NoCheckpoints)
  ckpt_lib.write_npz('gs://bucket/run/constants.npz', {'prior': np.ones(3)})
  with pytest.raises(eval_lib.EvaluationError, match='no checkpoint in gs://bucket/run/'):
    eval_lib.restore_best(tiny.config(), 'gs://bucket/run')


def test_launch_evaluate_initialises_jax_distributed_first():
  code = textwrap.dedent('''
      import runpy, sys
      from cider_jax import evaluate, parallel
      def initialize(cfg):
        print('initialize', cfg.initialize, flush=True)
      def run(config, workdir):
        print('evaluate', workdir, flush=True)
        raise evaluate.EvaluationError('stop here')
      parallel.initialize, evaluate.evaluate = initialize, run
      sys.argv = ['evaluate.py', '--config', 'configs/quickstart.py', '--workdir', 'gs://b/r',
                  '--config.distributed.initialize=True']
      runpy.run_path('launch/evaluate.py', run_name='__main__')
  ''')
  r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                     timeout=120, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert r.returncode == 2, r.stderr
  assert r.stdout.split('\n')[:2] == ['initialize True', 'evaluate gs://b/r'], r.stdout
  assert 'error: stop here' in r.stderr
