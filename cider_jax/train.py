"""The training loop: `train_and_evaluate(config, workdir)`.

Epochs over the grain pipeline; every epoch a validation on complete and on RMFM-masked input;
early stopping on the main validation metric (Non0_acc_2 / Acc_7), never before
`train.min_epochs`; orbax checkpoints (latest for resuming, best for evaluation);
`metrics.jsonl`, a training-curve PNG; then the evaluation of the best checkpoint.

The workdir may be a Cloud Storage URI (gs://BUCKET/PATH): its files go through etils.epath.
In a multi-host run every process trains and saves checkpoints (orbax coordinates them); only
process 0 writes metrics.jsonl, the plot and constants.npz.
"""
import dataclasses
import json
import signal
import sys
import time
from typing import Any, Callable, Optional, Tuple

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from cider_jax import checkpoint as ckpt_lib
from cider_jax import configuration
from cider_jax import eval_step, evaluate, masks, metrics, optim, parallel, run_state
from cider_jax import spec as spec_lib
from cider_jax.data import pipeline
from cider_jax.models import bert
from cider_jax.train_step import make_train_step


class TrainingError(RuntimeError):
  pass


def check_finite(step: int, scalars: dict, checkpoint_root) -> None:
  """TrainingError naming the step and every loss / gradient term if one is not finite."""
  terms = {k: v for k, v in scalars.items() if k.startswith(('loss', 'grad'))}
  if all(np.isfinite(v) for v in terms.values()):
    return
  raise TrainingError(
      f'non-finite loss or gradient at step {step}: '
      + ', '.join(f'{k}={v:.4g}' for k, v in terms.items())
      + f'; stopped, the last good checkpoint is kept in {checkpoint_root}/latest '
      '(lower optim.lr or set optim.grad_clip)')


# ------------------------------------------------------------------------------ validation

def validate(eval_fn, params, consts, split, config, n_devices, rate=0.0):
  """Main-metric-family numbers on a split, complete (rate 0) or RMFM-masked at `rate`."""
  # complete input = rate 0 (all-ones keeps): one compiled eval step serves both
  keeps = masks.test_keep('RMFM', rate, split.text_mask, split.audio_mask, split.vision_mask,
                          seed=config.eval.seed, aligned=bool(config.data.aligned))
  batches = pipeline.eval_batches(split, config.train.eval_batch_size, config.task, keeps=keeps)
  out = eval_step.run_batches(eval_fn, params, consts, batches, n_devices)
  labels = split.labels(config.task)
  m = metrics.classification_metrics(out['logp'], labels, config.task)
  counts = np.bincount(np.argmax(out['logp'], -1), minlength=out['logp'].shape[-1])
  m.update(predicted_classes=int((counts > 0).sum()), top_class=int(np.argmax(counts)))
  if 'logp_cf' in out:  # MACI: the debiased prediction at the τ best on this split
    taus = metrics.tau_grid(*config.maci.tau_grid)
    tau, _ = metrics.select_tau(out['logp'], out['logp_cf'], labels, config.task, taus)
    m['debiased'] = dict(metrics.debiased_metrics(out['logp'], out['logp_cf'], labels,
                                                  config.task, tau), tau=tau)
  return m


def selection_score(v_full: dict, config) -> float:
  """The validation number that picks the best checkpoint (train.select_on): the main metric
  of the prediction the run deploys, i.e. debiased (at its validation τ) when the model has
  MACI ('auto'), else factual."""
  main = metrics.main_metric(config.task)
  rule = configuration.selection_rule(config.train.get('select_on', 'auto'),
                                      bool(config.maci.enabled))
  return v_full['debiased'][main] if rule == 'debiased' else v_full[main]


def collapse_warning(meta: dict, v_full: dict, config) -> Optional[str]:
  """Counts the epochs in a row whose every validation prediction is one class (in `meta`);
  the warning once they reach train.collapse_epochs, else None."""
  one_class = v_full['predicted_classes'] == 1
  meta['one_class_epochs'] = meta.get('one_class_epochs', 0) + 1 if one_class else 0
  n = config.train.collapse_epochs
  if not n or meta['one_class_epochs'] != n:
    return None
  return (f'warning: the model has predicted class {v_full["top_class"]} for every validation '
          f'example for {n} epochs in a row: it is not learning from its inputs. Likely '
          'causes: audio / vision features on raw scales (check them with python -m '
          'cider_jax.data.mmsa FILE and keep data.standardize=True), a learning rate too high '
          'or too low for this data (optim.lr), one class dominating the train split, or token '
          'ids from another vocabulary than model.text_encoder.path. Try data.standardize=True, '
          'a lower optim.lr, a smaller train.batch_size, or optim.grad_clip.')


# ------------------------------------------------------------------------------ loop

class _Stop:
  """SIGTERM / SIGINT → finish the current step, save, exit cleanly."""

  def __init__(self):
    self.requested = False
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    if self.requested:  # second signal: give up at once
      raise KeyboardInterrupt
    self.requested = True
    print(f'\nsignal {signum}: saving a checkpoint at the next step boundary, then exiting '
          '(send again to abort at once)', file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


class MetricsLog:
  """<workdir>/metrics.jsonl, one JSON record a line, written by process 0 only.

  On a local disk each record is appended at once. An object store (gs://) cannot append: the
  records wait in memory and `flush` rewrites the file with them added (at every epoch end,
  where the checkpoint is saved too, and when training stops).
  """

  def __init__(self, path):
    self.path = epath.Path(path)
    self.enabled = ckpt_lib.is_writer()
    self._local = ckpt_lib.is_local(path)
    self._pending = []

  def append(self, record: dict) -> None:
    if not self.enabled:
      return
    line = json.dumps(record) + '\n'
    if self._local:
      with self.path.open('a') as f:
        f.write(line)
    else:
      self._pending.append(line)

  def flush(self) -> None:
    if not self._pending:
      return
    old = self.path.read_text() if self.path.exists() else ''
    self.path.write_text(old + ''.join(self._pending))
    self._pending = []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.flush()


def _scalar_metrics(m):
  return {k: float(np.asarray(v).reshape(-1)[0]) for k, v in m.items()
          if k not in ('logp_cf', 'grads')}


@dataclasses.dataclass
class _Run:
  """What the epochs of a run share; `meta` (epoch, early stopping, iterator) changes."""
  config: Any
  splits: dict
  ckpts: ckpt_lib.Checkpoints
  meta: dict
  save_meta: Callable[[], dict]   # meta and what a checkpoint's JSON records besides
  iterator: Any
  steps_per_epoch: int
  p_step: Callable
  p_eval: Callable
  r_eval_consts: Any              # replicated over the local devices
  log: MetricsLog


def train_and_evaluate(config, workdir: str,
                       on_epoch: Optional[Callable[[int, float], None]] = None
                       ) -> Optional[dict]:
  """Train (resuming from <workdir>/checkpoints/latest if present), then evaluate the best.

  on_epoch(epoch, value): called after each epoch's validation and checkpoints with the number
  of epochs done and the epoch's selection score (`selection_score`, complete input; a sweep
  reports it to its pruner); an exception it raises ends the run there.
  """
  parallel.initialize(config.distributed)
  configuration.validate(config, workdir=workdir)  # after initialize: it counts the devices
  parallel.enable_compilation_cache(config.train.compilation_cache)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  parallel.check_batch(config.train.batch_size, jax.device_count())
  run, r_state = _start(config, workdir)
  with _Stop() as stop, run.log:
    while (not run.meta['done'] and run.meta['epoch'] < config.train.num_epochs
           and not stop.requested):
      t0 = time.time()
      r_state, step, position = _train_epoch(run, r_state, stop)
      if stop.requested and position != 0:
        run.ckpts.save('latest', step, parallel.unreplicate(r_state), run.save_meta())
        print(f'saved step {step} (mid-epoch); run the same command again to resume', flush=True)
        return None
      value = _end_epoch(run, r_state, step, t0)
      if on_epoch is not None:
        on_epoch(run.meta['epoch'], value)
  if ckpt_lib.is_writer():
    _plot_curves(run.log.path, epath.Path(workdir) / 'training_curves.png')
  if stop.requested:
    print('stopped on request; run the same command again to resume', flush=True)
    return None
  if config.train.evaluate_at_end:
    return evaluate.evaluate(config, workdir)
  return None


def _start(config, workdir) -> Tuple[_Run, Any]:
  """(_Run, replicated TrainState): the data, constants and fresh state of a run, resumed from
  <workdir>/checkpoints/latest when it has one."""
  special = run_state.special_tokens(config)
  splits = pipeline.load_splits(config, workdir, special)
  spec = spec_lib.spec_from_split(splits['train'], config)
  bert_config = spec_lib.text_encoder_config(config)
  run_state.check_token_ids(splits, bert_config.vocab_size)
  encoder, encoder_vars = bert.load_pretrained(config.model.text_encoder.path,
                                               config.model.text_encoder.num_layers)
  c = run_state.constants(config, splits, spec, encoder, encoder_vars, workdir, special)
  model, tx, labels, state = run_state.init_state(
      config, spec, bert_config, run_state.train_consts(c, bert_config.vocab_size, special),
      encoder_vars['params'])
  del encoder_vars
  ckpts = ckpt_lib.Checkpoints(workdir)
  state, meta = _resume(ckpts, state, config)
  local_batch = config.train.batch_size // jax.process_count()
  steps_per_epoch = pipeline.steps_per_epoch(splits['train'], local_batch)
  if steps_per_epoch == 0:
    raise TrainingError(f'the train split has {len(splits["train"].label3)} examples, fewer '
                        f'than one batch of {local_batch}; lower train.batch_size')
  total_steps = steps_per_epoch * config.train.num_epochs
  if config.train.max_steps:
    total_steps = min(total_steps, config.train.max_steps)
  it = pipeline.train_iterator(splits['train'], local_batch, seed=config.train.seed,
                               task=config.task, shard=parallel.process_shard_options())
  if meta['iterator'] is not None:
    pipeline.set_iterator_state(it, meta['iterator'])
  save_meta = lambda: dict(meta, config=ckpt_lib.config_to_dict(config),
                           spec=ckpt_lib.spec_to_json(spec),
                           bias_vocab=np.asarray(c['bias_vocab']).tolist())
  e_consts = run_state.eval_consts(c, bert_config.vocab_size, spec.num_classes, special)
  run = _Run(config=config, splits=splits, ckpts=ckpts, meta=meta, save_meta=save_meta,
             iterator=it, steps_per_epoch=steps_per_epoch,
             p_step=make_train_step(model, tx, labels, config, axis_name='batch',
                                    special=special,
                                    lr_factor=optim.lr_factor(config.optim, total_steps)),
             p_eval=eval_step.make_eval_step(model, axis_name='batch', special=special),
             r_eval_consts=parallel.replicate(e_consts),
             log=MetricsLog(epath.Path(workdir) / 'metrics.jsonl'))
  return run, parallel.replicate(state)


def _resume(ckpts, state, config) -> Tuple[Any, dict]:
  """(state, meta): the newest readable latest checkpoint's, or `state` and a fresh meta."""
  meta = {'epoch': 0, 'best': None, 'best_epoch': None, 'bad_epochs': 0, 'iterator': None,
          'done': False, 'one_class_epochs': 0}
  restored = ckpts.restore('latest', state, config)
  if restored is not None:
    state, saved = restored
    meta.update({k: saved[k] for k in meta if k in saved})
    print(f'resumed from {ckpts.root}/latest at step {int(state.step)}, epoch {meta["epoch"]}',
          flush=True)
  return state, meta


def _train_epoch(run: _Run, r_state, stop) -> Tuple[Any, int, int]:
  """(r_state, step, position in the epoch) after the rest of the current epoch's steps, or
  fewer: up to train.max_steps or a stop request (position 0: the epoch is complete)."""
  config, epoch = run.config, run.meta['epoch']
  bar = tqdm(total=run.steps_per_epoch, desc=f'epoch {epoch + 1}/{config.train.num_epochs}',
             dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
  t0, position, n_dev = time.time(), 0, jax.local_device_count()
  step = int(parallel.unreplicate(r_state.step))
  max_steps = config.train.max_steps
  while position < run.steps_per_epoch:
    # the epoch position lives in the iterator; resume mid-epoch where it stopped
    batch = next(run.iterator)
    r_state, m = run.p_step(r_state, parallel.shard(batch, n_dev))
    step += 1
    position = pipeline.position_in_epoch(run.iterator, run.steps_per_epoch)
    sm = _scalar_metrics(m)  # waits for the step; the next batch is prefetched meanwhile
    check_finite(step, sm, run.ckpts.root)
    if step % config.train.log_every == 0 or position == 0:
      run.log.append(dict(step=step, epoch=epoch, **sm))
      bar.set_postfix(loss=f'{sm["loss"]:.3f}',
                      sps=f'{bar.n * config.train.batch_size / max(time.time() - t0, 1e-9):.0f}')
    bar.update(1)
    if stop.requested or (max_steps and step >= max_steps) or position == 0:
      break
  bar.close()
  run.meta['iterator'] = pipeline.get_iterator_state(run.iterator)
  return r_state, step, position


def _end_epoch(run: _Run, r_state, step: int, t0: float) -> float:
  """Validation, early-stopping bookkeeping, the metrics record and the checkpoints."""
  config, meta = run.config, run.meta
  main, rate = metrics.main_metric(config.task), config.eval.valid_rate
  rp = parallel.replicate(parallel.unreplicate(r_state.params))
  n_dev = jax.local_device_count()
  v_full = validate(run.p_eval, rp, run.r_eval_consts, run.splits['valid'], config, n_dev)
  v_miss = validate(run.p_eval, rp, run.r_eval_consts, run.splits['valid'], config, n_dev,
                    rate=rate)
  score = selection_score(v_full, config)
  improved = _early_stopping(meta, score, step, config)
  warning = collapse_warning(meta, v_full, config)
  record = {'epoch': meta['epoch'], 'step': step, 'epoch_s': round(time.time() - t0, 2),
            'valid': v_full, f'valid_rmfm_{rate}': v_miss, 'score': score,
            'best_epoch': meta['best_epoch']}
  run.log.append(dict(record, warning=warning) if warning else record)
  debiased = v_full.get('debiased')
  print(f'epoch {meta["epoch"]}: valid {main} {v_full[main]:.4f} (RMFM {rate}: '
        f'{v_miss[main]:.4f}'
        + (f'; debiased {debiased[main]:.4f} at τ {debiased["tau"]:.1f}' if debiased else '')
        + f'), best {meta["best"]:.4f} at epoch {meta["best_epoch"]}', flush=True)
  if warning:
    print(warning, file=sys.stderr, flush=True)
  stop = stop_record(meta, step, config)
  if stop is not None:
    run.log.append(stop)
    print(stop['message'], flush=True)
  run.log.flush()
  host_state = parallel.unreplicate(r_state)
  if improved:
    run.ckpts.save('best', step, host_state, run.save_meta())
  run.ckpts.save('latest', step, host_state, run.save_meta())
  return score  # the epoch's selection score (complete input)


def _early_stopping(meta: dict, score: float, step: int, config) -> bool:
  """Counts the epoch just validated into `meta`; whether `score` is a new best.

  The run is done (meta['done']) once `train.patience` epochs in a row brought no new best,
  but never before `train.min_epochs` epochs, or once `train.max_steps` steps are taken.
  """
  meta['epoch'] += 1
  improved = meta['best'] is None or score > meta['best']
  if improved:
    meta.update(best=float(score), best_epoch=meta['epoch'], bad_epochs=0)
  else:
    meta['bad_epochs'] += 1
  if (meta['bad_epochs'] >= config.train.patience
      and meta['epoch'] >= config.train.min_epochs):
    meta['done'] = True
  if config.train.max_steps and step >= config.train.max_steps:
    meta['done'] = True
  return improved


def stop_record(meta: dict, step: int, config) -> Optional[dict]:
  """The metrics.jsonl record (with its console `message`) of a run that ends before
  `train.num_epochs` epochs; None while it goes on or when it ran them all."""
  if not meta['done'] or meta['epoch'] >= config.train.num_epochs:
    return None
  t = config.train
  if t.max_steps and step >= t.max_steps:
    setting = {'max_steps': t.max_steps}
    why = f'train.max_steps={t.max_steps} reached at step {step}'
  else:
    setting = {'patience': t.patience, 'min_epochs': t.min_epochs}
    why = (f'no new best validation score for {meta["bad_epochs"]} epochs '
           f'(train.patience={t.patience}, train.min_epochs={t.min_epochs})')
  message = (f'early stop after epoch {meta["epoch"]} of {t.num_epochs}: {why}; '
             f'best {meta["best"]:.4f} at epoch {meta["best_epoch"]}')
  return {'early_stop': dict(setting, epoch=meta['epoch'], step=step,
                             best_epoch=meta['best_epoch'], best_score=meta['best']),
          'message': message}


def _plot_curves(metrics_path, out_png):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  steps, loss, epochs, valid = [], [], [], []
  for line in epath.Path(metrics_path).read_text().splitlines():
    r = json.loads(line)
    if 'loss' in r:
      steps.append(r['step'])
      loss.append(r['loss'])
    elif 'valid' in r:
      epochs.append(r['step'])
      valid.append(r['valid'])
  fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
  ax[0].plot(steps, loss)
  ax[0].set(xlabel='step', ylabel='student loss', title='training loss')
  for k in (valid[0].keys() if valid else []):
    if k.startswith(('Non0_acc', 'Acc_', 'Has0_acc')):
      ax[1].plot(epochs, [v[k] for v in valid], marker='o', label=k)
  if valid and 'debiased' in valid[0]:
    k = next(k for k in valid[0]['debiased'] if k.startswith(('Non0_acc', 'Acc_7')))
    ax[1].plot(epochs, [v['debiased'][k] for v in valid], marker='s', label=f'{k}, debiased')
  ax[1].set(xlabel='step', ylabel='validation', title='validation (complete input)')
  if valid:
    ax[1].legend()
  fig.tight_layout()
  ckpt_lib.write_figure(fig, out_png, dpi=100)
  plt.close(fig)
