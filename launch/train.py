"""Train CIDer (and evaluate the best checkpoint at the end).

  python launch/train.py --config configs/quickstart.py [--workdir W]
  python launch/train.py --config configs/rmfm.py --config.data.dir=DIR --workdir=W
  python launch/train.py --config CFG --dry_run        # parameter counts, no data, no training

Any config field can be overridden: --config.train.batch_size=64.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cider_jax import configuration  # noqa: E402
from cider_jax.data.validate import DataError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(__file__), '..', 'configs', 'quickstart.py'),
    'Path to a config file (configs/*.py); fields can be overridden with --config.a.b=value.')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, metrics.jsonl, plots and the evaluation report '
    '(default: runs/<config name>). An existing run there is resumed.')
_DRY_RUN = flags.DEFINE_bool(
    'dry_run', False, 'Build the model from the config with random weights (no data) and print '
    'one JSON line of parameter counts.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  try:
    if _DRY_RUN.value:
      from cider_jax import spec
      print(json.dumps(spec.parameter_counts(config)))
      return
    workdir = _WORKDIR.value or os.path.join(
        'runs', os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS['config'])))[0])
    configuration.check_workdir(workdir)  # before JAX loads: a file or unwritable place
    from cider_jax import train
    train.train_and_evaluate(config, workdir)
  except (configuration.ConfigError, DataError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(2)
  except train_errors() as e:  # a run that cannot go on: non-finite loss, unusable checkpoint
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


def train_errors():
  from cider_jax import checkpoint, train
  return train.TrainingError, checkpoint.CheckpointError


if __name__ == '__main__':
  app.run(main, flags_parser=configuration.parse_flags)
