"""The training loop: `train_and_evaluate(config, workdir)`.

Epochs over the grain pipeline; every epoch a validation on complete and on RMFM-masked input;
early stopping on the main validation metric (Non0_acc_2 / Acc_7); orbax checkpoints (latest
for resuming, best for evaluation); `metrics.jsonl`, a training-curve PNG; then the evaluation
of the best checkpoint.

The workdir may be a Cloud Storage URI (gs://BUCKET/PATH): its files go through etils.epath.
In a multi-host run every process trains and saves checkpoints (orbax coordinates them); only
process 0 writes metrics.jsonl, the plot and constants.npz.
"""
import json
import signal
import sys
import time
from typing import Optional

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from cider_jax import checkpoint as ckpt_lib
from cider_jax import configuration
from cider_jax import eval_step, evaluate, masks, metrics, parallel, run_state
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
  return metrics.classification_metrics(out['logp'], split.labels(config.task), config.task)


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


def train_and_evaluate(config, workdir: str) -> Optional[dict]:
  """Train (resuming from <workdir>/checkpoints/latest if present), then evaluate the best."""
  parallel.initialize(config.distributed)
  configuration.validate(config, workdir=workdir)  # after initialize: it counts the devices
  parallel.enable_compilation_cache(config.train.compilation_cache)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  n_dev = jax.local_device_count()
  parallel.check_batch(config.train.batch_size, jax.device_count())
  local_batch = config.train.batch_size // jax.process_count()

  splits = pipeline.load_splits(config, workdir)
  spec = spec_lib.spec_from_split(splits['train'], config)
  bert_config = spec_lib.text_encoder_config(config)
  run_state.check_token_ids(splits, bert_config.vocab_size)
  special = run_state.special_tokens(config)
  encoder, encoder_vars = bert.load_pretrained(config.model.text_encoder.path,
                                               config.model.text_encoder.num_layers)
  c = run_state.constants(config, splits, spec, encoder, encoder_vars, workdir, special)
  t_consts = run_state.train_consts(c, bert_config.vocab_size, special)
  e_consts = run_state.eval_consts(c, bert_config.vocab_size, spec.num_classes, special)
  model, tx, labels, state = run_state.init_state(config, spec, bert_config, t_consts,
                                                  encoder_vars['params'])
  del encoder_vars

  ckpts = ckpt_lib.Checkpoints(workdir)
  meta = {'epoch': 0, 'best': None, 'best_epoch': None, 'bad_epochs': 0, 'iterator': None,
          'done': False}
  restored = ckpts.restore('latest', state, config)
  if restored is not None:
    state, saved = restored
    meta.update({k: saved[k] for k in meta if k in saved})
    print(f'resumed from {ckpts.root}/latest at step {int(state.step)}, epoch {meta["epoch"]}',
          flush=True)

  log = MetricsLog(epath.Path(workdir) / 'metrics.jsonl')
  main = metrics.main_metric(config.task)
  steps_per_epoch = pipeline.steps_per_epoch(splits['train'], local_batch)
  if steps_per_epoch == 0:
    raise TrainingError(f'the train split has {len(splits["train"].label3)} examples, fewer '
                        f'than one batch of {local_batch}; lower train.batch_size')
  it = pipeline.train_iterator(splits['train'], local_batch, seed=config.train.seed,
                               task=config.task, shard=parallel.process_shard_options())
  if meta['iterator'] is not None:
    pipeline.set_iterator_state(it, meta['iterator'])

  p_step = make_train_step(model, tx, labels, config, axis_name='batch')
  p_eval = eval_step.make_eval_step(model, axis_name='batch')
  r_state = parallel.replicate(state)
  r_econsts = parallel.replicate(e_consts)
  del state
  max_steps = config.train.max_steps
  save_meta = lambda: dict(meta, config=ckpt_lib.config_to_dict(config),
                           spec=ckpt_lib.spec_to_json(spec),
                           bias_vocab=np.asarray(c['bias_vocab']).tolist())

  with _Stop() as stop, log:
    while not meta['done'] and meta['epoch'] < config.train.num_epochs and not stop.requested:
      epoch = meta['epoch']
      bar = tqdm(total=steps_per_epoch, desc=f'epoch {epoch + 1}/{config.train.num_epochs}',
                 dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
      t0, done_in_epoch = time.time(), 0
      step = int(parallel.unreplicate(r_state.step))
      while done_in_epoch < steps_per_epoch:
        # the epoch position lives in the iterator; resume mid-epoch where it stopped
        batch = next(it)
        r_state, m = p_step(r_state, parallel.shard(batch, n_dev))
        step += 1
        done_in_epoch = pipeline.position_in_epoch(it, steps_per_epoch)
        sm = _scalar_metrics(m)  # waits for the step; the next batch is prefetched meanwhile
        check_finite(step, sm, ckpts.root)
        if step % config.train.log_every == 0 or done_in_epoch == 0:
          log.append(dict(step=step, epoch=epoch, **sm))
          bar.set_postfix(loss=f'{sm["loss"]:.3f}',
                          sps=f'{bar.n * config.train.batch_size / max(time.time() - t0, 1e-9):.0f}')
        bar.update(1)
        if stop.requested or (max_steps and step >= max_steps):
          break
        if done_in_epoch == 0:
          break
      bar.close()
      meta['iterator'] = pipeline.get_iterator_state(it)
      if stop.requested and done_in_epoch != 0:
        ckpts.save('latest', step, parallel.unreplicate(r_state), save_meta())
        print(f'saved step {step} (mid-epoch); run the same command again to resume', flush=True)
        return None
      params = parallel.unreplicate(r_state.params)
      rp = parallel.replicate(params)
      v_full = validate(p_eval, rp, r_econsts, splits['valid'], config, n_dev)
      v_miss = validate(p_eval, rp, r_econsts, splits['valid'], config, n_dev,
                        rate=config.eval.valid_rate)
      meta['epoch'] = epoch + 1
      score = v_full[main]
      improved = meta['best'] is None or score > meta['best']
      if improved:
        meta.update(best=float(score), best_epoch=epoch + 1, bad_epochs=0)
      else:
        meta['bad_epochs'] += 1
      if meta['bad_epochs'] >= config.train.patience:
        meta['done'] = True
      if max_steps and step >= max_steps:
        meta['done'] = True
      record = {'epoch': epoch + 1, 'step': step, 'epoch_s': round(time.time() - t0, 2),
                'valid': v_full, f'valid_rmfm_{config.eval.valid_rate}': v_miss,
                'best_epoch': meta['best_epoch']}
      log.append(record)
      log.flush()
      print(f'epoch {epoch + 1}: valid {main} {score:.4f} (RMFM {config.eval.valid_rate}: '
            f'{v_miss[main]:.4f}), best {meta["best"]:.4f} at epoch {meta["best_epoch"]}',
            flush=True)
      host_state = parallel.unreplicate(r_state)
      if improved:
        ckpts.save('best', step, host_state, save_meta())
      ckpts.save('latest', step, host_state, save_meta())
  if ckpt_lib.is_writer():
    _plot_curves(log.path, epath.Path(workdir) / 'training_curves.png')
  if stop.requested:
    print('stopped on request; run the same command again to resume', flush=True)
    return None
  if config.train.evaluate_at_end:
    return evaluate.evaluate(config, workdir)
  return None


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
  ax[1].set(xlabel='step', ylabel='validation', title='validation (complete input)')
  if valid:
    ax[1].legend()
  fig.tight_layout()
  ckpt_lib.write_figure(fig, out_png, dpi=100)
  plt.close(fig)
