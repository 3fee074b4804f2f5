"""Evaluate the best checkpoint of a run on every missing mode × rate, factual and debiased.

  python launch/evaluate.py --config configs/quickstart.py --workdir runs/quickstart
  python launch/evaluate.py --config configs/rmfm.py --original_weights mosi.npz --workdir W

Writes WORKDIR/eval/report.json, report.csv, predictions.npz and plots; prints a table.
WORKDIR may be gs://BUCKET/PATH; with --config.distributed.initialize=True every worker of a
multi-host TPU evaluates and worker 0 writes the files.
τ (counterfactual strength) is chosen on the validation split.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cider_jax import configuration  # noqa: E402
from cider_jax.data.validate import DataError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'The config the run was trained with (configs/*.py, same overrides).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The training run\'s directory (with '
                                '--original_weights: where the evaluation is written).')
_ORIGINAL = flags.DEFINE_string(
    'original_weights', None, 'Evaluate the original PyTorch CIDer\'s trained weights instead '
    'of a cider_jax run: an .npz written by python -m cider_jax.compat.export_original.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  from cider_jax import checkpoint, evaluate, parallel
  config = _CONFIG.value
  # as training does: jax.distributed before anything counts devices (multi-host Cloud TPU)
  parallel.initialize(config.distributed)
  parallel.enable_compilation_cache(config.train.compilation_cache)
  from cider_jax.compat.original import OriginalWeightsError
  try:
    if _ORIGINAL.value:
      evaluate.evaluate_original(config, _WORKDIR.value, _ORIGINAL.value)
    else:
      evaluate.evaluate(config, _WORKDIR.value)
  except (evaluate.EvaluationError, checkpoint.CheckpointError, FileNotFoundError,
          OriginalWeightsError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except (configuration.ConfigError, DataError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=configuration.parse_flags)
