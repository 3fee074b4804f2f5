"""The Optuna study of a sweep: its storage, sampler and pruner, and counts of its trials.

  study, shown = open_study(url, workdir, config.sweep)

`url` None: an SQLite file `<workdir>/study.db`. A database URL (sqlite:///…, postgresql://…,
mysql+pymysql://…) gives an RDB storage with heartbeat: a running trial whose heartbeat is
older than `sweep.grace_s` is marked failed and queued again with the same values. Any other
value is the path of an Optuna journal file (no heartbeat). `shown` is the storage's name
with any password masked, for messages.
"""
import os
import time
from typing import Optional

from cider_jax import checkpoint as ckpt_lib

# optuna is imported where it is used: the launcher checks its flags first.

FINISHED = ('COMPLETE', 'PRUNED')  # the trial states that count towards --trials


class SweepError(ValueError):
  """A sweep that cannot start: bad search space, unreachable storage, unusable setting."""


def _storage(url: Optional[str], workdir, sweep_cfg):
  """(storage, printable name): an RDB storage with heartbeat, or a journal file."""
  import optuna  # pylint: disable=g-import-not-at-top
  if url is None:
    if not ckpt_lib.is_local(workdir):
      raise SweepError(f'workdir {workdir!r} is not local: the default storage '
                       '(an SQLite file in the workdir) needs a local workdir; pass --storage')
    url = 'sqlite:///' + os.path.abspath(os.path.join(workdir, 'study.db'))
  if '://' not in url:  # a journal file
    parent = os.path.dirname(os.path.abspath(url))
    if not os.path.isdir(parent):
      raise SweepError(f'--storage {url}: the journal file\'s folder {parent} does not exist')
    from optuna.storages import journal  # pylint: disable=g-import-not-at-top
    return journal.JournalStorage(journal.JournalFileBackend(url)), url
  import sqlalchemy  # pylint: disable=g-import-not-at-top
  try:
    shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
  except Exception:  # pylint: disable=broad-except
    raise SweepError(f'--storage {url!r} is not a database URL (dialect://user:password@host/'
                     'database) nor a journal file path') from None
  engine_kwargs = {'connect_args': {'timeout': 60}} if url.startswith('sqlite') else {}
  retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=sweep_cfg.max_retry,
                                                           inherit_intermediate_values=True)
  storage = error = None
  for attempt in range(5):
    try:
      storage = optuna.storages.RDBStorage(
          url, engine_kwargs=engine_kwargs, heartbeat_interval=int(sweep_cfg.heartbeat_s),
          grace_period=int(sweep_cfg.grace_s), heartbeat_stale_trial_callback=retry)
      break
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as e:
      # workers started together on a new database all create its tables: one wins, the
      # others find them on the next try
      error = e
      if not isinstance(e, sqlalchemy.exc.IntegrityError) and not any(
          s in str(e) for s in ('already exists', 'locked')):
        break  # unreachable, refused, …
      time.sleep(0.5 * (attempt + 1))
    except Exception as e:  # pylint: disable=broad-except
      error = e
      break
  if storage is None:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    hint = (f'; install the database driver of {url.split(":", 1)[0]} (e.g. psycopg[binary] '
            'for postgresql, PyMySQL for mysql+pymysql)' if isinstance(error, ImportError)
            else '')
    raise SweepError(f'--storage {shown}: cannot open the study storage '
                     f'({type(error).__name__}: {first}){hint}')
  return storage, shown


def sampler(seed: int, startup_trials: int):
  """A TPE sampler whose random draws for trial k depend on (seed, k) only: one worker is
  reproducible, and workers started with the same seed on one study sample different trials."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optuna  # pylint: disable=g-import-not-at-top

  class TrialSeededTPE(optuna.samplers.TPESampler):

    def before_trial(self, study, trial):
      super().before_trial(study, trial)
      # pylint: disable-next=protected-access
      for i, rng in enumerate((self._rng, self._random_sampler._rng)):
        rng.rng.set_state(np.random.RandomState([seed % 2**32, trial.number, i]).get_state())

  return TrialSeededTPE(seed=seed, n_startup_trials=startup_trials)


def pruner(sweep_cfg):
  import optuna  # pylint: disable=g-import-not-at-top
  if sweep_cfg.pruner == 'none':
    return optuna.pruners.NopPruner()
  return optuna.pruners.MedianPruner(n_startup_trials=sweep_cfg.pruner_startup_trials,
                                     n_warmup_steps=sweep_cfg.pruner_warmup_epochs)


def open_study(url: Optional[str], workdir, sweep_cfg):
  """(study, shown): the study `sweep_cfg.study_name` (maximised), created if new."""
  import optuna  # pylint: disable=g-import-not-at-top
  store, shown = _storage(url, workdir, sweep_cfg)
  try:
    study = optuna.create_study(
        storage=store, study_name=sweep_cfg.study_name, direction='maximize',
        sampler=sampler(sweep_cfg.seed, sweep_cfg.startup_trials), pruner=pruner(sweep_cfg),
        load_if_exists=True)
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise SweepError(f'--storage {shown}: cannot open study {sweep_cfg.study_name!r} '
                     f'({type(e).__name__}: {first})') from None
  if study.direction.name != 'MAXIMIZE':
    raise SweepError(f'study {sweep_cfg.study_name!r} in {shown} minimises; use another '
                     'config.sweep.study_name')
  return study, shown


def retry_running(study) -> None:
  """Marks every running trial failed and queues it again with the same values (for a
  storage without heartbeat, once its dead workers' trials are known to be dead)."""
  import optuna  # pylint: disable=g-import-not-at-top
  retry = optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)
  storage = study._storage  # pylint: disable=protected-access
  for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
    try:
      # pylint: disable-next=protected-access
      storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:  # it finished meanwhile
      continue
    retry(study, t)
    print(f'trial {t.number} was running: marked failed, queued again', flush=True)


def counts(study) -> dict:
  out = {}
  for t in study.get_trials(deepcopy=False):
    out[t.state.name] = out.get(t.state.name, 0) + 1
  return out


def finished(study) -> int:
  c = counts(study)
  return sum(c.get(s, 0) for s in FINISHED)


def best(study, trials=None):
  """The complete trial of highest value (the earliest of equals), or None; of `trials`, a
  snapshot of the study's, when given."""
  trials = study.get_trials(deepcopy=False) if trials is None else trials
  complete = [t for t in trials if t.state.name == 'COMPLETE']
  return max(complete, key=lambda t: (t.value, -t.number)) if complete else None
