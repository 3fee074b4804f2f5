"""Hyper-parameter search on the validation split: an Optuna study of training runs.

  best = sweep.run(config, workdir, trials=300, storage=None)

Every trial is an ordinary training run in `<workdir>/trials/NNNN/` (its config.json,
metrics.jsonl, checkpoints) with the values the TPE sampler (seeded by `sweep.seed`) picks
for the fields of `config.sweep.space` (search_space.py). Its objective is the main
validation metric (Non0_acc_2, or Acc_7 for 7-class) of its best checkpoint, as the run
selects it (`train.selection_score`: debiased when the model has MACI); each epoch's
value goes to the pruner (`sweep.pruner`), which may stop a trial early. No test number is
computed until the end, and then for the best trial only.

Storage: `<workdir>/study.db` (SQLite) by default, or a database URL (postgresql://…,
mysql+pymysql://…) or an Optuna journal file path. Several workers started with the same
command on one storage share the study: each asks it for the next trial. A worker that dies
leaves its trial without heartbeat; after `sweep.grace_s` the next worker to start a trial
marks it failed and queues a retry, which continues the dead run from its checkpoints.
A worker stopped by SIGTERM / Ctrl-C queues the retry itself. Running the command again
continues until the study holds `trials` finished (complete or pruned) trials.

Only the best complete trial keeps its checkpoints; those of the others are deleted once they
are beaten. At the end: `<workdir>/best.json`, `trials.csv`, `optimization_history.png`,
`param_importances.png`, and the best trial's evaluation in `trials/NNNN/eval/`.
"""
import csv
import io
import json
import os
import socket
import sys
import warnings
from typing import Callable, Optional

from etils import epath

from cider_jax import checkpoint as ckpt_lib
from cider_jax import configuration, metrics, search_space
from cider_jax import study as study_lib

# optuna and JAX are imported where they are used: the launcher checks its flags first.

SweepError = study_lib.SweepError


class Stopped(Exception):
  """A trial's run stopped on request (SIGTERM / Ctrl-C) before it finished."""


# ------------------------------------------------------------------------------ one trial

def train_trial(config, trial_dir: str, report: Callable[[int, float], None]) -> float:
  """The default trial: train (resuming from the trial's checkpoints, if any) and return the
  best checkpoint's main validation metric. Raises Stopped if the run stopped on request."""
  import jax  # pylint: disable=g-import-not-at-top
  from cider_jax import train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(config, trial_dir, on_epoch=report)
  finally:
    jax.clear_caches()  # the next trial's programs differ (dropout rates are constants)
  ckpts = ckpt_lib.Checkpoints(trial_dir)
  latest = ckpts.read_meta('latest') or {}
  if not (latest.get('done') or latest.get('epoch', 0) >= config.train.num_epochs):
    raise Stopped(trial_dir)
  return float(ckpts.read_meta('best')['best'])


def evaluate_trial(config, trial_dir: str) -> None:
  """The default evaluation of the best trial: launch/evaluate.py's, into <trial_dir>/eval/."""
  from cider_jax import evaluate  # pylint: disable=g-import-not-at-top
  evaluate.evaluate(config, trial_dir)


def trial_dir(workdir, number: int) -> epath.Path:
  return epath.Path(workdir) / 'trials' / f'{number:04d}'


def trial_config(base, values: dict, workdir):
  """The configuration of a trial: `base` with the trial's values; data cached once for all
  trials; no evaluation at the end of training (only the best trial is evaluated)."""
  config = search_space.apply(base, values)
  config.train.evaluate_at_end = False
  if not config.data.cache_dir and ckpt_lib.is_local(workdir):
    config.data.cache_dir = os.fspath(epath.Path(workdir) / 'data')
  return config


def _frozen(trial):
  """The FrozenTrial (storage record) of a running trial."""
  return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def _adopt(trial, workdir) -> None:
  """A retried trial continues its failed predecessor's run: the folder is renamed."""
  history = _frozen(trial).system_attrs.get('retry_history') or []
  if not history:
    return
  old, new = trial_dir(workdir, history[-1]), trial_dir(workdir, trial.number)
  if old.exists() and not new.exists():
    old.rename(new)
    print(f'trial {trial.number} continues trial {history[-1]} from its checkpoints', flush=True)


def _objective(trial, *, base, params, workdir, run_trial):
  import optuna  # pylint: disable=g-import-not-at-top
  values = {p.name: p.suggest(trial) for p in params}
  config = trial_config(base, values, workdir)
  _adopt(trial, workdir)
  tdir = trial_dir(workdir, trial.number)
  tdir.mkdir(parents=True, exist_ok=True)
  trial.set_user_attr('worker', f'{socket.gethostname()}:{os.getpid()}')
  (tdir / 'config.json').write_text(json.dumps(ckpt_lib.config_to_dict(config), indent=1))
  (tdir / 'params.json').write_text(json.dumps(values, indent=1))
  print(f'trial {trial.number}: ' + ' '.join(f'{k}={v}' for k, v in values.items()), flush=True)

  def report(epoch, value):
    trial.report(float(value), int(epoch))
    if trial.should_prune():
      raise optuna.TrialPruned(f'epoch {epoch}: {value:.4f} is below the median')

  try:
    return run_trial(config, os.fspath(tdir), report)
  except Stopped:
    # queue the same parameters again: the retry continues this run from its checkpoint
    optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(
        trial.study, _frozen(trial))
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # no "trial failed" traceback: the
    raise                                               # worker stops here on request


# ------------------------------------------------------------------------------ the study

def _check(config, workdir, trials):
  configuration.validate(config, workdir=workdir)
  s = config.sweep
  if s.pruner not in ('median', 'none'):
    raise SweepError(f"config.sweep.pruner is {s.pruner!r}; expected 'median' or 'none'")
  for field in ('heartbeat_s', 'grace_s', 'startup_trials', 'pruner_startup_trials'):
    if not (isinstance(s[field], int) and s[field] >= (0 if 'startup' in field else 1)):
      raise SweepError(f'config.sweep.{field} is {s[field]!r}; expected a '
                       f'{"non-negative" if "startup" in field else "positive"} integer')
  if s.grace_s <= s.heartbeat_s:
    raise SweepError(f'config.sweep.grace_s is {s.grace_s}; expected more than '
                     f'sweep.heartbeat_s={s.heartbeat_s}')
  if config.distributed.initialize:
    raise SweepError('config.distributed.initialize is True: a sweep runs one worker per host '
                     '(each on its local devices); start one per host on a shared --storage')
  if not (isinstance(trials, int) and trials >= 1):
    raise SweepError(f'--trials is {trials!r}; expected a positive integer')


MAX_FAILED_IN_A_ROW = 3


def _after_trial(workdir, target, params):
  """The callback run after each trial: a progress line, old checkpoints removed, stop at
  `target` finished trials; a SweepError after MAX_FAILED_IN_A_ROW failed trials in a row."""
  failed = []

  def callback(study, trial):
    best = study_lib.best(study)
    state = {'FAIL': 'failed'}.get(trial.state.name, trial.state.name.lower())
    if trial.state.name == 'PRUNED':
      state += f' at epoch {trial.last_step}'
    if trial.value is not None:
      state += f': {trial.value:.4f}'
    best_s = f'{best.value:.4f} (trial {best.number})' if best else '-'
    values = search_space.values_of(params, trial.params)
    print(f'[{study_lib.finished(study)}/{target}] trial {trial.number} {state}; best '
          f'{best_s}; ' + ' '.join(f'{k}={v}' for k, v in values.items()), flush=True)
    remove_beaten_checkpoints(study, workdir)
    failed[:] = failed + [trial.number] if trial.state.name == 'FAIL' else []
    if len(failed) >= MAX_FAILED_IN_A_ROW:
      raise SweepError(f'trials {", ".join(map(str, failed))} failed in a row (the errors '
                       'are above); stopped: check the configuration')
    if study_lib.finished(study) >= target:
      study.stop()

  return callback


def remove_beaten_checkpoints(study, workdir) -> None:
  """Deletes the checkpoints of every complete or pruned trial but the best complete one.

  Failed trials keep theirs: a retry continues from them, or they show where a run failed.
  """
  # one snapshot: a trial completing after it is not in it as finished, so is kept
  trials = study.get_trials(deepcopy=False)
  best = study_lib.best(study, trials)
  for t in trials:
    if t.state.name in study_lib.FINISHED and (best is None or t.number != best.number):
      ckpts = trial_dir(workdir, t.number) / 'checkpoints'
      try:
        ckpts.rmtree()
      except FileNotFoundError:  # none, or another worker is removing it too
        pass


def run(config, workdir: str, trials: int, storage: Optional[str] = None,
        retry_running: bool = False, run_trial: Callable = train_trial,
        evaluate_best: Callable = evaluate_trial) -> Optional[dict]:
  """Runs trials until the study holds `trials` finished ones; writes and returns best.json.

  retry_running: first mark every running trial of the study failed and queue its retry (a
  journal storage keeps no heartbeat: its dead workers' trials are retried so, when no other
  worker is running).

  run_trial(config, trial_dir, report) -> value: one trial (default: a training run);
  report(epoch, value) may raise optuna.TrialPruned. evaluate_best(config, trial_dir): the
  best trial's evaluation (default: every missing mode and rate, valid and test). Returns None
  when stopped on request.
  """
  import optuna  # pylint: disable=g-import-not-at-top
  _check(config, workdir, trials)
  params = search_space.parse(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  warnings.filterwarnings('ignore', category=optuna.exceptions.ExperimentalWarning)
  s = config.sweep
  study, shown = study_lib.open_study(storage, workdir, s)
  if s.first_trial_default and not study.get_trials(deepcopy=False):
    defaults = {p.name: search_space.get_field(config, p.name) for p in params}
    if all(p.contains(defaults[p.name]) for p in params):  # else TPE starts at random
      study.enqueue_trial(defaults, skip_if_exists=True)  # workers starting together
  optuna.storages.fail_stale_trials(study)  # database storages: dead workers' trials
  if retry_running:
    study_lib.retry_running(study)
  done = study_lib.finished(study)
  print(f'study {s.study_name!r} in {shown}: {done} of {trials} trials finished '
        f'({study_lib.counts(study)}); objective: validation {metrics.main_metric(config.task)}',
        flush=True)
  if done < trials:
    from cider_jax import train  # pylint: disable=g-import-not-at-top
    objective = lambda trial: _objective(trial, base=config, params=params, workdir=workdir,
                                         run_trial=run_trial)
    # a trial that diverges or whose values do not fit together fails; the sweep goes on
    failures = (train.TrainingError, ckpt_lib.CheckpointError, configuration.ConfigError)
    try:
      study.optimize(objective, callbacks=[_after_trial(workdir, trials, params)],
                     gc_after_trial=True, catch=failures)
    except Stopped:
      print('stopped on request; the interrupted trial is queued again: run the same command '
            'to continue', flush=True)
      return None
  return finish(study, config, params, workdir, shown, evaluate_best)


# ------------------------------------------------------------------------------ results

def finish(study, config, params, workdir, shown: str = '',
           evaluate_best: Callable = evaluate_trial) -> Optional[dict]:
  """best.json, trials.csv, plots; the best trial's evaluation once no trial is running."""
  best = study_lib.best(study)
  _write_trials_csv(study, params, workdir)
  if best is None:
    print('no complete trial yet: nothing to report', flush=True)
    return None
  _plots(study, workdir)
  counts = study_lib.counts(study)
  bdir = trial_dir(workdir, best.number)
  report = bdir / 'eval' / 'report.json'
  values = search_space.values_of(params, best.params)
  out = {'trial': best.number, 'value': best.value,
         'metric': f'valid {metrics.main_metric(config.task)}', 'params': values,
         'flags': search_space.as_flags(values),
         'workdir': os.path.relpath(os.fspath(bdir), os.fspath(workdir)),
         'eval_report': None, 'trials': counts, 'storage': shown,
         'study_name': config.sweep.study_name}
  running = counts.get('RUNNING', 0)  # queued (WAITING) trials beyond --trials never run
  if not report.exists() and not running:
    print(f'evaluating the best trial, {best.number} (validation {best.value:.4f})', flush=True)
    evaluate_best(trial_config(config, values, workdir), os.fspath(bdir))
  if report.exists():
    out['eval_report'] = os.path.relpath(os.fspath(report), os.fspath(workdir))
  else:
    print(f'{running} trial(s) still running (in other workers, or left by a dead worker '
          'until sweep.grace_s passes): the last worker to finish evaluates the best trial; '
          'or run the command again later', flush=True)
  ckpt_lib.write_text(epath.Path(workdir) / 'best.json', json.dumps(out, indent=1))
  print(f'best: trial {best.number}, validation {best.value:.4f}: '
        + ' '.join(out['flags']), flush=True)
  print(f'wrote {workdir}/best.json, trials.csv and plots', flush=True)
  return out


def _write_trials_csv(study, params, workdir) -> None:
  trials = study.get_trials(deepcopy=False)
  names = sorted({k for t in trials for k in t.params})
  table = io.StringIO(newline='')
  w = csv.writer(table)
  w.writerow(['number', 'state', 'value', 'epochs', 'duration_s', 'worker', 'retry_of']
             + names)
  for t in trials:
    duration = (t.datetime_complete - t.datetime_start).total_seconds() if (
        t.datetime_complete and t.datetime_start) else ''
    history = t.system_attrs.get('retry_history') or ['']
    w.writerow([t.number, t.state.name, '' if t.value is None else t.value,
                len(t.intermediate_values), duration, t.user_attrs.get('worker', ''),
                history[-1]] + [search_space.values_of(params, t.params).get(k, '')
                                for k in names])
  ckpt_lib.write_text(epath.Path(workdir) / 'trials.csv', table.getvalue())


def _plots(study, workdir) -> None:
  """optimization_history.png; param_importances.png from 3 complete trials on (with fewer,
  Optuna spreads the importance evenly)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from optuna.visualization import matplotlib as ovm  # pylint: disable=g-import-not-at-top
  plots = [('optimization_history', ovm.plot_optimization_history)]
  if study_lib.counts(study).get('COMPLETE', 0) >= 3:
    plots.append(('param_importances', ovm.plot_param_importances))
  for name, plot in plots:
    try:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ax = plot(study)
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
      print(f'note: no {name}.png ({type(e).__name__}: {e})', file=sys.stderr)
      continue
    fig = ax.figure
    fig.tight_layout()
    ckpt_lib.write_figure(fig, epath.Path(workdir) / f'{name}.png', dpi=100)
    plt.close(fig)
