"""Hyper-parameter search (Optuna, TPE), every trial scored on the validation split.

  python launch/sweep.py --config configs/rmfm.py --config.data.dir=DIR --workdir runs/sweep \\
      --trials 300 [--storage URL]

--config.* overrides apply to every trial; config.sweep holds the search space and the
sampler, pruner and heartbeat settings. Each trial trains in WORKDIR/trials/NNNN/. The study
lives in WORKDIR/study.db (SQLite) unless --storage names a database URL or a journal file:
the same command started on several machines or devices shares one study. Running it again
continues until --trials trials have finished. At the end: WORKDIR/best.json (the best trial's
validation value and its --config flags), trials.csv, plots, and the best trial's evaluation.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cider_jax import configuration  # noqa: E402
from cider_jax.data.validate import DataError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (configs/*.py); --config.a.b=value overrides a '
    'field in every trial.')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory of the sweep: study.db, trials/NNNN/ (one training run each), '
    'best.json, trials.csv, plots. An existing sweep there is continued.')
_TRIALS = flags.DEFINE_integer(
    'trials', None, 'Finished (complete or pruned) trials wanted in the study; a worker stops '
    'once the study holds that many.')
_STORAGE = flags.DEFINE_string(
    'storage', None, 'Where the study lives (default: sqlite:///WORKDIR/study.db): a database '
    'URL Optuna supports (postgresql://USER:PASSWORD@HOST/DB, mysql+pymysql://…, sqlite:///'
    'PATH) or the path of an Optuna journal file on a shared file system. Workers started on '
    'several machines with the same --storage share the study.')
_RETRY_RUNNING = flags.DEFINE_bool(
    'retry_running', False, 'First mark the trials the study shows as running failed and run '
    'them again from their checkpoints: after a worker died on a journal-file storage (which '
    'keeps no heartbeat), when no other worker is running. Database storages need not: a '
    'trial without heartbeat for config.sweep.grace_s is retried by the next worker.')
flags.mark_flags_as_required(['config', 'workdir', 'trials'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  from cider_jax import checkpoint, evaluate, search_space, sweep
  try:
    sweep.run(_CONFIG.value, _WORKDIR.value, _TRIALS.value, _STORAGE.value,
              retry_running=_RETRY_RUNNING.value)
  except (configuration.ConfigError, DataError, sweep.SweepError,
          search_space.SearchSpaceError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(2)
  except (evaluate.EvaluationError, checkpoint.CheckpointError) as e:  # the best trial's
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=configuration.parse_flags)
