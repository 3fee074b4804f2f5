"""The sweep (cider_jax/sweep.py, launch/sweep.py): search space, study, resume, workers.

Most tests run the study's machinery with a pretend training run (tests/helpers/sweep_fake.py:
trial scores are a formula of the parameters, recomputed here); the slow test runs real
training through the launcher.
"""
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from cider_jax import search_space, sweep
from tests.helpers import sweep_fake

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _study(workdir, storage=None):
  url = storage or f'sqlite:///{workdir}/study.db'
  if '://' not in url:
    from optuna.storages import journal
    url = journal.JournalStorage(journal.JournalFileBackend(url))
  return optuna.load_study(study_name='cider', storage=url)


def _states(study):
  return [t.state.name for t in sorted(study.trials, key=lambda t: t.number)]


def _run(workdir, trials, storage=None, retry_running=False, **fields):
  return sweep.run(sweep_fake.config(**fields), str(workdir), trials, storage, retry_running,
                   run_trial=sweep_fake.fake_trial, evaluate_best=sweep_fake.fake_evaluate)


def _worker(workdir, trials, env, *fields):
  """A worker process running the pretend trials; fields: 'name=JSON' of config.sweep."""
  return subprocess.Popen(
      [sys.executable, '-m', 'tests.helpers.sweep_fake', str(workdir), str(trials), '-',
       *fields], cwd=ROOT,
      env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# ------------------------------------------------------------------------------ search space

def test_search_space_candidates_and_flags():
  c = sweep_fake.config()
  params = {p.name: p for p in search_space.parse(c)}
  # the original's space
  assert sorted(params) == ['loss.w_attn', 'loss.w_rec', 'loss.w_rep', 'model.attn_dropout',
                            'model.embed_dropout', 'model.layers', 'model.num_heads',
                            'model.out_dropout']
  assert params['model.layers'].candidates() == [1, 2, 3, 4]
  assert params['model.num_heads'].candidates() == [1, 2, 4, 8]
  assert params['model.attn_dropout'].candidates() == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
  assert len(params['loss.w_rep'].candidates()) == 11
  assert params['loss.w_rep'].clean(0.30000000000000004) == 0.3
  assert search_space.as_flags({'model.layers': 2, 'model.attn_dropout': 0.3}) == [
      '--config.model.attn_dropout=0.3', '--config.model.layers=2']


@pytest.mark.parametrize('name', sorted(
    f[:-3] for f in os.listdir(os.path.join(ROOT, 'configs')) if f[0] != '_' and f.endswith('.py')))
def test_every_shipped_config_has_a_valid_search_space(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  assert len(search_space.parse(config)) == 8


@pytest.mark.parametrize('name, spec, message', [
    ('model.no_such', ('int', 1, 2), "the config has no field 'model.no_such'"),
    ('model.layers', ('int', 3, 1), 'an empty range (low 3 > high 1)'),
    ('model.num_heads', ('choice',), 'an empty choice'),
    ('model.layers', ('range', 1, 2), "expected ('int', low, high[, step])"),
    ('model.attn_dropout', ('int', 0, 1), 'not an integer'),
    ('model.num_heads', ('choice', 4, 3), 'allows 3, which the configuration rejects'),
    ('model.out_dropout', ('float', 0.0, 1.0, 0.5), 'allows 1.0, which the configuration'),
])
def test_bad_search_space_names_the_entry(name, spec, message):
  c = sweep_fake.config()
  section, field = name.split('.')
  c.sweep.space[section][field] = spec
  with pytest.raises(search_space.SearchSpaceError) as e:
    search_space.parse(c)
  assert f'config.sweep.space.{name}' in str(e.value) and message in str(e.value), str(e.value)


def test_bad_storage_is_one_error_line_before_any_trial(tmp_path):
  with pytest.raises(sweep.SweepError, match='no_such_dir.* does not exist'):
    _run(tmp_path / 'w', 1, str(tmp_path / 'no_such_dir' / 'journal.log'))
  with pytest.raises(sweep.SweepError, match=r'postgresql://u:\*\*\*@.*cannot open'):
    _run(tmp_path / 'w', 1, 'postgresql://u:secret@localhost:1/db')
  assert not (tmp_path / 'w' / 'trials').exists()
  r = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'sweep.py'), '--config',
                      os.path.join(ROOT, 'configs', 'quickstart.py'), '--workdir',
                      str(tmp_path / 'l'), '--trials', '2',
                      "--config.sweep.space.model.layers=('int', 4, 1)"],
                     capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      "error: config.sweep.space.model.layers is ('int', 4, 1): an empty range "
      '(low 4 > high 1)'], r.stderr


# ------------------------------------------------------------------------------ the study

@pytest.mark.parametrize('journal', [False, True])
def test_three_trials_then_one_more(tmp_path, journal):
  storage = str(tmp_path / 'study.log') if journal else None
  best = _run(tmp_path, 3, storage)
  study = _study(tmp_path, storage)
  assert _states(study) == ['COMPLETE'] * 3
  # trial 0 is the config's own values (sweep.first_trial_default): layers 3, attn_dropout 0
  assert study.trials[0].params['model.layers'] == 3
  for t in study.trials:  # the objective is the best epoch of the (pretend) validation curve
    values = search_space.values_of(search_space.parse(sweep_fake.config()), t.params)
    assert t.value == pytest.approx(sweep_fake.score(values, 3), abs=1e-9)
    assert sorted(t.intermediate_values) == [1, 2, 3]
  top = max(study.trials, key=lambda t: t.value)
  assert best['trial'] == top.number and best['value'] == top.value
  assert json.load(open(tmp_path / 'best.json')) == best
  assert best['eval_report'] == f'trials/{top.number:04d}/eval/report.json'
  # only the best trial keeps its checkpoints
  kept = sorted(p for p in os.listdir(tmp_path / 'trials')
                if os.path.exists(tmp_path / 'trials' / p / 'checkpoints'))
  assert kept == [f'{top.number:04d}']
  assert (tmp_path / 'trials.csv').read_text().count('\n') == 4
  assert (tmp_path / 'optimization_history.png').exists()
  assert (tmp_path / 'param_importances.png').exists()  # from 3 complete trials on

  again = _run(tmp_path, 4, storage)
  study = _study(tmp_path, storage)
  assert _states(study) == ['COMPLETE'] * 4
  assert again['value'] == max(t.value for t in study.trials)
  # the test split is evaluated once per best trial
  log = (tmp_path / 'evaluations.log').read_text().split()
  assert len(log) == len(set(log)) and log[-1] == f'{again["trial"]:04d}'


def test_a_poor_trial_is_pruned(tmp_path, monkeypatch):
  monkeypatch.setenv('FAKE_BY_NUMBER', '1')  # epoch e of trial k scores 1 - 0.1 k + 0.01 e
  _run(tmp_path, 3, pruner_startup_trials=1, pruner_warmup_epochs=1)
  study = _study(tmp_path)
  assert _states(study) == ['COMPLETE', 'PRUNED', 'PRUNED']
  # trial 0 scores 1.01, 1.02, 1.03; trial 1's first epoch, 0.91, is below the median of the
  # complete trials at epoch 1 (1.01): pruned there; trial 2 (0.81) likewise
  assert study.trials[0].value == pytest.approx(1.03)
  assert study.trials[1].intermediate_values == {1: pytest.approx(0.91)}
  assert study.trials[2].intermediate_values == {1: pytest.approx(0.81)}
  assert os.path.exists(tmp_path / 'trials' / '0000' / 'checkpoints')
  assert not os.path.exists(tmp_path / 'trials' / '0001' / 'checkpoints')
  assert not os.path.exists(tmp_path / 'trials' / '0002' / 'checkpoints')
  assert not (tmp_path / 'param_importances.png').exists()  # 1 complete trial


def test_a_killed_worker_s_trial_is_retried_from_its_checkpoint(tmp_path):
  p = _worker(tmp_path, 2, {'FAKE_HANG_TRIAL': '1'})
  progress = tmp_path / 'trials' / '0001' / 'progress.json'
  reported = lambda: progress.exists() and 1 in _study(tmp_path).trials[1].intermediate_values
  deadline = time.time() + 120
  while time.time() < deadline and p.poll() is None and not reported():
    time.sleep(0.2)
  assert reported(), p.communicate()[0][-3000:]  # epoch 1 saved and reported, then it hangs
  os.kill(p.pid, signal.SIGKILL)  # mid-trial: no clean-up, no state written
  p.wait()
  time.sleep(3)  # past sweep.grace_s = 2 without a heartbeat
  best = _run(tmp_path, 2)
  study = _study(tmp_path)
  assert _states(study) == ['COMPLETE', 'FAIL', 'COMPLETE']
  dead, retry = study.trials[1], study.trials[2]
  assert retry.params == dead.params
  assert retry.system_attrs['failed_trial'] == 1
  # the retry continued the dead run: it took over its folder and resumed after epoch 1
  assert not (tmp_path / 'trials' / '0001').exists()
  done = json.load(open(tmp_path / 'trials' / '0002' / 'progress.json'))
  assert done['resumed_from'] == 1 and len(done['values']) == 3
  assert sorted(retry.intermediate_values) == [1, 2, 3]
  assert best['trial'] in (0, 2)


def test_a_worker_stopped_on_request_queues_its_trial_again(tmp_path, monkeypatch):
  monkeypatch.setenv('FAKE_STOP_TRIAL', '1')
  assert _run(tmp_path, 2) is None
  study = _study(tmp_path)
  assert _states(study) == ['COMPLETE', 'FAIL', 'WAITING']
  monkeypatch.delenv('FAKE_STOP_TRIAL')
  _run(tmp_path, 2)
  study = _study(tmp_path)
  assert _states(study) == ['COMPLETE', 'FAIL', 'COMPLETE']
  assert study.trials[2].params == study.trials[1].params
  done = json.load(open(tmp_path / 'trials' / '0002' / 'progress.json'))
  assert done['resumed_from'] == 1 and len(done['values']) == 3


def test_a_sweep_whose_trials_all_fail_stops(tmp_path, monkeypatch):
  monkeypatch.setenv('FAKE_DIVERGE', '1')
  with pytest.raises(sweep.SweepError, match='trials 0, 1, 2 failed in a row'):
    _run(tmp_path, 5)
  assert _states(_study(tmp_path)) == ['FAIL'] * 3


def test_retry_running_requeues_a_journal_study_s_running_trials(tmp_path):
  storage = str(tmp_path / 'study.log')
  _run(tmp_path, 1, storage)
  study = _study(tmp_path, storage)
  dead = study.ask()  # a trial left running by a worker that died (no heartbeat: journal)
  for param in search_space.parse(sweep_fake.config()):
    param.suggest(dead)
  _run(tmp_path, 2, storage, retry_running=True)
  study = _study(tmp_path, storage)
  assert _states(study) == ['COMPLETE', 'FAIL', 'COMPLETE']
  assert study.trials[2].params == study.trials[1].params
  assert study.trials[2].system_attrs['failed_trial'] == 1


def test_two_workers_share_one_study(tmp_path):
  # trial 0 sampled too (no enqueued baseline), so that every trial's values are the sampler's
  workers = [_worker(tmp_path, 4, {'FAKE_EPOCH_S': '0.3'}, 'first_trial_default=false')
             for _ in range(2)]
  outs = [w.communicate(timeout=300)[0] for w in workers]
  assert all(w.returncode == 0 for w in workers), outs
  study = _study(tmp_path)
  finished = [t for t in study.trials if t.state.name == 'COMPLETE']
  # each worker stops once 4 are finished; the other's trial in flight may make a fifth
  assert 4 <= len(finished) <= 5 and len(study.trials) == len(finished), _states(study)
  assert len({t.user_attrs['worker'] for t in finished}) == 2  # both took trials
  params = [tuple(sorted(t.params.items())) for t in finished]
  assert len(set(params)) == len(params)  # no two trials alike (per-trial sampler seeds)
  for t in finished:  # every trial ran in its own folder with its own values
    saved = json.load(open(tmp_path / 'trials' / f'{t.number:04d}' / 'params.json'))
    assert saved == search_space.values_of(search_space.parse(sweep_fake.config()), t.params)
  best = json.load(open(tmp_path / 'best.json'))
  assert best['value'] == max(t.value for t in finished)


# ------------------------------------------------------------------------------ real training

def _real_sweep(tmp_path, epochs=2):
  """(workdir, command) of launch/sweep.py on the quickstart at a tiny size."""
  small = ['--config.data.synthetic.n_train=96', '--config.data.synthetic.n_valid=48',
           '--config.data.synthetic.n_test=48', '--config.data.synthetic.text_len=12',
           '--config.data.synthetic.audio_len=30', '--config.data.synthetic.vision_len=40',
           '--config.model.text_encoder.num_layers=1', '--config.train.batch_size=16',
           f'--config.train.num_epochs={epochs}', '--config.eval.modes=("RMFM",)',
           '--config.eval.rates=(0.0,0.5,1.0)', f'--config.data.cache_dir={tmp_path}/data',
           f'--config.train.compilation_cache={tmp_path}/xla']
  w = tmp_path / 'w'
  return w, [sys.executable, os.path.join(ROOT, 'launch', 'sweep.py'), '--config',
             os.path.join(ROOT, 'configs', 'quickstart.py'), '--workdir', str(w)] + small


@pytest.mark.slow
def test_a_killed_real_trial_resumes_from_its_checkpoint(tmp_path):
  """A worker killed (SIGKILL: no clean-up) after its trial's first epoch is checkpointed: the
  next worker fails the trial once its heartbeat is older than sweep.grace_s, retries it with
  the same parameters in the dead trial's folder, and the training resumes from that
  checkpoint (not from step 0) and completes the remaining epochs."""
  w, cmd = _real_sweep(tmp_path, epochs=3)
  cmd += ['--trials', '1', '--config.sweep.heartbeat_s=1', '--config.sweep.grace_s=3']
  p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
  latest = w / 'trials' / '0000' / 'checkpoints' / 'latest'

  def saved_epoch():  # orbax renames a checkpoint into place once it is complete
    epochs = [0]
    for meta in latest.glob('*/meta/metadata'):
      try:
        epochs.append(json.loads(meta.read_text())['epoch'])
      except (OSError, ValueError, KeyError):
        pass
    return max(epochs)

  deadline = time.time() + 900
  while time.time() < deadline and p.poll() is None and saved_epoch() < 1:
    time.sleep(0.1)
  os.kill(p.pid, signal.SIGKILL)
  out = p.communicate()[0]
  killed_after = saved_epoch()
  assert 1 <= killed_after < 3, out[-3000:]
  time.sleep(4)  # past sweep.grace_s without a heartbeat
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
  assert r.returncode == 0, r.stderr[-3000:]
  study = _study(w)
  assert _states(study) == ['FAIL', 'COMPLETE']
  assert study.trials[1].params == study.trials[0].params
  assert study.trials[1].system_attrs['failed_trial'] == 0
  assert not (w / 'trials' / '0000').exists()
  tdir = w / 'trials' / '0001'
  # 96 train examples at batch 16: 6 steps an epoch
  resumed = (f'resumed from {tdir}/checkpoints/latest at step {6 * killed_after}, '
             f'epoch {killed_after}')
  assert resumed in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
  records = [json.loads(line) for line in open(tdir / 'metrics.jsonl')]
  assert [rec['epoch'] for rec in records if 'valid' in rec][-1] == 3
  assert study.trials[1].value == max(rec['score'] for rec in records if 'valid' in rec)
  assert (tdir / 'eval' / 'report.json').exists()


@pytest.mark.slow
def test_sweep_of_real_training_runs(tmp_path):
  """Two tiny training trials, then a third; best.json against the database and the best
  trial's own metrics.jsonl."""
  w, cmd = _real_sweep(tmp_path)
  for n in (2, 3):
    r = subprocess.run(cmd + ['--trials', str(n)], capture_output=True, text=True, cwd=ROOT,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len([t for t in _study(w).trials if t.state.name == 'COMPLETE']) == n
  study, best = _study(w), json.load(open(w / 'best.json'))
  assert best['value'] == study.best_value and best['trial'] == study.best_trial.number
  tdir = w / best['workdir']
  epochs = [r for r in map(json.loads, open(tdir / 'metrics.jsonl')) if 'valid' in r]
  # the objective is the selection score: with MACI (the quickstart's) the debiased validation
  # Non0_acc_2 at the epoch's validation τ, the best over the trial's epochs
  assert best['value'] == max(e['valid']['debiased']['Non0_acc_2'] for e in epochs)
  assert all(e['score'] == e['valid']['debiased']['Non0_acc_2'] for e in epochs)
  assert (tdir / 'eval' / 'report.json').exists() and (tdir / 'checkpoints' / 'best').exists()
  others = [t.number for t in study.trials if t.number != best['trial']]
  assert not any((w / 'trials' / f'{n:04d}' / 'checkpoints').exists() for n in others)
  assert not any((w / 'trials' / f'{n:04d}' / 'eval').exists() for n in others)
