"""A pretend training run for sweep tests: no JAX, a fraction of a second a trial.

`fake_trial(config, trial_dir, report)` runs config.train.num_epochs "epochs". Epoch e of a
trial scores `score(config, e)`, a formula of the trial's parameters the tests recompute by
hand; every epoch writes `checkpoints/best.txt` and `progress.json` (epochs done, best so far),
from which a trial continued in the same folder resumes. Environment knobs:

  FAKE_HANG_TRIAL=k      trial k hangs after its first epoch (for killing its worker)
  FAKE_STOP_TRIAL=k      trial k stops on request after its first epoch (as on SIGTERM)
  FAKE_EPOCH_S=s         seconds each epoch takes (two workers overlapping)
  FAKE_DIVERGE=1         every trial stops with a non-finite loss (train.TrainingError)
  FAKE_BY_NUMBER=1       score by trial number instead (1 - 0.1 * number + 0.01 * epoch)
"""
import json
import os
import sys
import time


def score(params: dict, epoch: int, number: int = 0) -> float:
  if os.environ.get('FAKE_BY_NUMBER'):
    return round(1.0 - 0.1 * number + 0.01 * epoch, 6)
  return round(0.5 + 0.05 * params['model.layers'] - 0.2 * params['model.attn_dropout']
               + 0.01 * epoch, 6)


def fake_trial(config, trial_dir, report):
  number = int(os.path.basename(trial_dir))
  params = {k: v for k, v in json.load(open(os.path.join(trial_dir, 'params.json'))).items()}
  params.setdefault('model.layers', config.model.layers)
  params.setdefault('model.attn_dropout', config.model.attn_dropout)
  progress_path = os.path.join(trial_dir, 'progress.json')
  progress = (json.load(open(progress_path)) if os.path.exists(progress_path)
              else {'epoch': 0, 'best': None, 'resumed_from': None, 'values': []})
  if progress['epoch']:
    progress['resumed_from'] = progress['epoch']
  os.makedirs(os.path.join(trial_dir, 'checkpoints'), exist_ok=True)
  for epoch in range(progress['epoch'] + 1, config.train.num_epochs + 1):
    if os.environ.get('FAKE_HANG_TRIAL') == str(number) and epoch == 2:
      time.sleep(3600)
    if os.environ.get('FAKE_STOP_TRIAL') == str(number) and epoch == 2:
      from cider_jax import sweep  # pylint: disable=g-import-not-at-top
      raise sweep.Stopped(trial_dir)
    time.sleep(float(os.environ.get('FAKE_EPOCH_S', '0')))
    if os.environ.get('FAKE_DIVERGE'):
      from cider_jax import train  # pylint: disable=g-import-not-at-top
      raise train.TrainingError(f'non-finite loss at epoch {epoch}')
    value = score(params, epoch, number)
    progress['best'] = value if progress['best'] is None else max(progress['best'], value)
    progress['epoch'] = epoch
    progress['values'].append(value)
    with open(os.path.join(trial_dir, 'checkpoints', 'best.txt'), 'w') as f:
      f.write(str(progress['best']))
    with open(progress_path, 'w') as f:
      json.dump(progress, f)
    report(epoch, value)
  return progress['best']


def fake_evaluate(config, trial_dir):
  """Stands for the evaluation: eval/report.json naming the trial, one line in a log."""
  os.makedirs(os.path.join(trial_dir, 'eval'), exist_ok=True)
  with open(os.path.join(trial_dir, 'eval', 'report.json'), 'w') as f:
    json.dump({'trial': int(os.path.basename(trial_dir))}, f)
  with open(os.path.join(os.path.dirname(os.path.dirname(trial_dir)), 'evaluations.log'),
            'a') as f:
    f.write(os.path.basename(trial_dir) + '\n')


def config(**sweep_fields):
  """The quickstart config with 3 epochs, a fast heartbeat and `sweep_fields` set."""
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  c = quickstart.get_config()
  c.train.num_epochs = 3
  c.sweep.heartbeat_s = 1
  c.sweep.grace_s = 2
  for k, v in sweep_fields.items():
    c.sweep[k] = v
  return c


def main(argv):
  """python -m tests.helpers.sweep_fake WORKDIR TRIALS [STORAGE] [FIELD=VALUE …] (a worker)."""
  from cider_jax import sweep  # pylint: disable=g-import-not-at-top
  workdir, trials = argv[0], int(argv[1])
  storage = argv[2] if len(argv) > 2 and argv[2] != '-' else None
  fields = dict(a.split('=', 1) for a in argv[3:])
  c = config(**{k: json.loads(v) for k, v in fields.items()})
  sweep.run(c, workdir, trials, storage, run_trial=fake_trial, evaluate_best=fake_evaluate)


if __name__ == '__main__':
  main(sys.argv[1:])
