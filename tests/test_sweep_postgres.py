"""The sweep on a real PostgreSQL server: workers sharing one study through a database.

Marked `postgres` and deselected by default (pytest.ini): `python -m pytest -q -m postgres`.
Needs the PostgreSQL server programs (Debian: the `postgresql` package) and the driver of
requirements.txt. The test starts a server of its own (initdb into a temporary folder,
127.0.0.1 on a free port, as the `postgres` system user when run as root), whatever else runs
on the machine, and stops and deletes it at the end. Trials are the pretend runs of
tests/helpers/sweep_fake.py.
"""
import csv
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import optuna
import pytest

from cider_jax import search_space
from tests.helpers import sweep_fake

pytestmark = pytest.mark.postgres

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL = ('install the PostgreSQL server (Debian: apt-get install postgresql) to run the '
           'tests marked postgres')


def _server_bin() -> str:
  """The folder of the newest installed PostgreSQL server's programs (initdb, postgres)."""

  def version(path):
    v = path.split(os.sep)[-3]
    return (int(v), v) if v.isdigit() else (-1, v)

  found = sorted(glob.glob('/usr/lib/postgresql/*/bin/initdb'), key=version)
  if found:
    return os.path.dirname(found[-1])
  initdb = shutil.which('initdb')
  if initdb:
    return os.path.dirname(initdb)
  pytest.fail(f'no PostgreSQL server programs (/usr/lib/postgresql/*/bin/initdb): {INSTALL}')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _tail(path, n=3000) -> str:
  try:
    return open(path, errors='replace').read()[-n:]
  except OSError:
    return ''


def _ready(server, port: int, data: str, timeout_s: float) -> bool:
  """Whether `server` (a postgres process on `data`) accepts connections on `port` within
  `timeout_s`; False as soon as it exits."""
  import psycopg  # pylint: disable=g-import-not-at-top
  deadline = time.time() + timeout_s
  while time.time() < deadline and server.poll() is None:
    try:
      conn = psycopg.connect(host='127.0.0.1', port=port, user='postgres', dbname='postgres',
                             connect_timeout=3)
    except psycopg.OperationalError:
      time.sleep(0.2)
      continue
    try:
      with conn.cursor() as cur:  # this server, not another one that took the port
        cur.execute('SHOW data_directory')
        return os.path.realpath(cur.fetchone()[0]) == os.path.realpath(data)
    finally:
      conn.close()
  return False


def _stop(server) -> None:
  """Stops a postgres process: a fast shutdown (SIGINT), killed if it takes over 30 s."""
  if server.poll() is None:
    server.send_signal(signal.SIGINT)
    try:
      server.wait(timeout=30)
    except subprocess.TimeoutExpired:
      server.kill()
      server.wait(timeout=30)


@pytest.fixture
def postgres_url():
  """The URL of an empty database on a PostgreSQL server started for the test alone; the
  server is stopped and its folder deleted afterwards, whether the test passed or not."""
  import psycopg  # pylint: disable=g-import-not-at-top
  bindir = _server_bin()
  as_user = {}
  if os.geteuid() == 0:  # postgres refuses to run as root
    try:
      pw = pwd.getpwnam('postgres')
    except KeyError:
      pytest.fail(f'running as root and there is no postgres system user: {INSTALL}')
    as_user = {'user': pw.pw_uid, 'group': pw.pw_gid, 'extra_groups': []}
  base = tempfile.mkdtemp(prefix='cider_jax_pg_')
  server = None
  try:
    if as_user:
      os.chown(base, as_user['user'], as_user['group'])
    data, log = os.path.join(base, 'data'), os.path.join(base, 'server.log')
    r = subprocess.run([os.path.join(bindir, 'initdb'), '-D', data, '-U', 'postgres', '-A',
                        'trust', '-E', 'UTF8', '--no-locale', '--no-sync'],
                       cwd=base, capture_output=True, text=True, timeout=120, **as_user)
    assert r.returncode == 0, f'initdb failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}'
    for _ in range(3):  # a port found free may be taken before the server binds it
      port = _free_port()
      with open(log, 'a') as out:
        server = subprocess.Popen(
            [os.path.join(bindir, 'postgres'), '-D', data, '-p', str(port), '-k', base,
             '-c', 'listen_addresses=127.0.0.1', '-c', 'fsync=off',
             '-c', 'synchronous_commit=off', '-c', 'full_page_writes=off'],
            cwd=base, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            **as_user)
      if _ready(server, port, data, timeout_s=60):
        break
      _stop(server)
    else:
      pytest.fail(f'the PostgreSQL server did not start:\n{_tail(log)}')
    with psycopg.connect(host='127.0.0.1', port=port, user='postgres', dbname='postgres',
                         connect_timeout=10, autocommit=True) as conn:
      conn.execute('CREATE DATABASE sweep')
    yield f'postgresql://postgres@127.0.0.1:{port}/sweep'
  finally:
    if server is not None:
      _stop(server)
    shutil.rmtree(base, ignore_errors=True)


def _worker(workdir, trials, storage, env, log, *fields):
  """A worker process of the pretend trials, its output in `log`; fields: 'name=JSON' of
  config.sweep."""
  with open(log, 'w') as out:
    return subprocess.Popen(
        [sys.executable, '-m', 'tests.helpers.sweep_fake', str(workdir), str(trials), storage,
         *fields], cwd=ROOT, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=out,
        stderr=subprocess.STDOUT)


def test_two_workers_one_killed_share_a_postgresql_study(postgres_url, tmp_path):
  """Two workers started together on a new database; the one that takes trial 0 hangs after
  its first epoch and is killed. The other finishes the sweep, retrying trial 0 from its
  checkpoint; best.json and trials.csv agree with the database."""
  w, target = tmp_path / 'w', 5
  # trial 0 hangs in its second epoch (in whichever worker takes it); 0.8 s epochs keep the
  # other worker busy for well over sweep.grace_s after the kill, so that it retries trial 0
  env = {'FAKE_HANG_TRIAL': '0', 'FAKE_EPOCH_S': '0.8'}
  fields = ('first_trial_default=false', 'pruner="none"')
  logs = [tmp_path / f'worker{i}.log' for i in range(2)]
  workers = [_worker(w, target, postgres_url, env, log, *fields) for log in logs]
  outputs = lambda: '\n'.join(f'--- {log.name}\n{_tail(log)}' for log in logs)
  try:
    progress = w / 'trials' / '0000' / 'progress.json'
    study, hung = None, False
    deadline = time.time() + 120
    while time.time() < deadline and all(p.poll() is None for p in workers) and not hung:
      time.sleep(0.2)
      if study is None and progress.exists():  # a worker is in trial 0: the tables exist
        study = optuna.load_study(study_name='cider', storage=postgres_url)
      if study is not None:
        first = min(study.get_trials(deepcopy=False), key=lambda t: t.number)
        hung = 1 in first.intermediate_values  # epoch 1 saved and reported; it now hangs
    assert hung, outputs()
    pid = int(first.user_attrs['worker'].rsplit(':', 1)[1])
    assert pid in [p.pid for p in workers], (pid, outputs())
    dead = next(p for p in workers if p.pid == pid)
    survivor = next(p for p in workers if p.pid != pid)
    os.kill(dead.pid, signal.SIGKILL)  # mid-trial: no clean-up, no state written
    dead.wait(timeout=30)
    try:
      survivor.wait(timeout=150)
    except subprocess.TimeoutExpired:
      pytest.fail(f'the remaining worker did not finish in 150 s:\n{outputs()}')
    assert survivor.returncode == 0, outputs()
  finally:
    for p in workers:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)

  study = optuna.load_study(study_name='cider', storage=postgres_url)
  trials = sorted(study.trials, key=lambda t: t.number)
  states = [t.state.name for t in trials]
  # every trial accounted for: `target` complete, trial 0 failed, nothing else
  assert states.count('COMPLETE') == target and len(trials) == target + 1, (states, outputs())
  assert states[0] == 'FAIL', (states, outputs())
  killed, retry = trials[0], next(t for t in trials if t.system_attrs.get('failed_trial') == 0)
  assert retry.state.name == 'COMPLETE' and retry.params == killed.params
  assert retry.system_attrs['retry_history'] == [0]
  assert killed.user_attrs['worker'].endswith(f':{dead.pid}')
  assert {t.user_attrs['worker'] for t in trials[1:]} == {
      f'{socket.gethostname()}:{survivor.pid}'}
  # the retry continued the killed run: it took over its folder and resumed after epoch 1
  assert not (w / 'trials' / '0000').exists()
  assert f'trial {retry.number} continues trial 0 from its checkpoints' in _tail(logs[
      workers.index(survivor)], 100000)
  done = json.load(open(w / 'trials' / f'{retry.number:04d}' / 'progress.json'))
  assert done['resumed_from'] == 1 and len(done['values']) == 3
  assert sorted(killed.intermediate_values) == [1]
  assert sorted(retry.intermediate_values) == [1, 2, 3]
  params = search_space.parse(sweep_fake.config())
  for t in trials[1:]:  # each trial's value is the best epoch of its (pretend) curve
    values = search_space.values_of(params, t.params)
    assert t.value == pytest.approx(sweep_fake.score(values, 3), abs=1e-9)

  # best.json: the database's best trial, evaluated once
  complete = [t for t in trials if t.state.name == 'COMPLETE']
  top = max(complete, key=lambda t: (t.value, -t.number))
  best = json.load(open(w / 'best.json'))
  assert (best['trial'], best['value']) == (top.number, top.value)
  assert best['value'] == study.best_value
  assert best['trials'] == {'COMPLETE': target, 'FAIL': 1}
  assert best['storage'] == postgres_url and best['study_name'] == 'cider'
  assert best['eval_report'] == f'trials/{top.number:04d}/eval/report.json'
  assert (w / best['eval_report']).exists()
  assert (w / 'evaluations.log').read_text().split() == [f'{top.number:04d}']
  kept = sorted(p for p in os.listdir(w / 'trials')
                if os.path.exists(w / 'trials' / p / 'checkpoints'))
  assert kept == [f'{top.number:04d}']

  # trials.csv: one row per trial of the database, in order
  with open(w / 'trials.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert [(int(r['number']), r['state']) for r in rows] == [(t.number, t.state.name)
                                                           for t in trials]
  for r, t in zip(rows, trials):
    assert (float(r['value']) if r['value'] else None) == t.value
    assert int(r['epochs']) == len(t.intermediate_values)
    assert r['worker'] == t.user_attrs['worker']
    assert r['retry_of'] == ('0' if t.number == retry.number else '')
