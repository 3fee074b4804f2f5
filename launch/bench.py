"""Time the compiled MSSD train step (teacher + student update) on random inputs.

  python launch/bench.py                                  # MiniLM-size BERT, batch 32
  python launch/bench.py --bert_hidden 48 --bert_layers 1 --bert_heads 2   # tiny BERT
  python launch/bench.py --config.model.dtype=bfloat16

Shapes are MOSI unaligned (L 50, La 375, Lv 500, Da 5, Dv 20; --aligned: 50/50/50), 3
classes, a randomly initialised BERT of the given size. Prints one JSON line: ms_per_iter,
samples_per_s, compile_s, peak_rss_mb, device, flops_per_iter (XLA cost analysis; with the
native attention kernels, whose work XLA cannot see, that of the same step compiled with
model.kernels=xla) and flops_source, peak_gflops with its source (on CPU measured in
the same run as the float32 throughput of a 2048^3 matmul), fraction_of_peak and the
settings, kernels included.
"""
import functools
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(__file__), '..', 'configs', 'default.py'),
    'Config whose model / loss / optimiser fields are used (data fields are ignored).')
_BATCH = flags.DEFINE_integer('batch', 32, 'Global batch size.')
_HIDDEN = flags.DEFINE_integer('bert_hidden', 384, 'BERT hidden size.')
_LAYERS = flags.DEFINE_integer('bert_layers', 6, 'BERT layers.')
_HEADS = flags.DEFINE_integer('bert_heads', 12, 'BERT attention heads.')
_ALIGNED = flags.DEFINE_bool('aligned', False, 'Word-aligned shapes (50/50/50, no WSAM).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_DEVICES = flags.DEFINE_integer('devices', 0, 'Devices to pmap over (0: all local devices).')
_PROFILE = flags.DEFINE_string('profile', None, 'Write a jax.profiler trace of the timed steps '
                               'to this folder (open with Perfetto or TensorBoard).')
_PART = flags.DEFINE_enum('part', 'step', ['step', 'text_encoder'], 'What to time: the whole '
                          'train step, or only its text-encoder work (two forward + backward '
                          'passes of BERT, full and masked ids, no optimizer) to split the step.')
_PEAK = flags.DEFINE_float('peak_gflops', 0.0, 'Peak float32 GFLOP/s of the devices used. 0: on '
                           'CPU, measure it in the same run as the throughput of a 2048^3 float32 '
                           'matmul on the devices used; elsewhere unknown (fraction_of_peak null).')


def _matmul_gflops(devices, n=2048, repeats=5):
  """Float32 GFLOP/s of an n³ matmul on each device at once, best of `repeats` (all devices)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  x = jax.pmap(lambda i: jnp.full((n, n), 1.0, jnp.float32) * (i + 1), devices=devices)(
      np.arange(len(devices), dtype=np.float32))
  mm = jax.pmap(lambda a: a @ a, devices=devices)
  jax.block_until_ready(mm(x))
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(mm(x))
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 * len(devices) / best / 1e9


def _text_encoder_passes(config, model, bert_config):
  """(state, batch) → (state, metrics): the BERT forward + backward of the teacher (full ids)
  and of the student (about half the tokens [UNK]), with the step's dtype, dropout and, under
  optim.embedding_rows, its row-wise word embeddings (gradients per distinct id, not a table)."""
  import jax
  import jax.numpy as jnp
  from cider_jax import embedding_rows, tokens, updates
  from cider_jax.models.bert import BertEncoder
  # the step's BERT, with the step's implementations
  encoder = BertEncoder(bert_config, model.base.bert_layers, model.base.dtype, model.ops)

  def loss(params, slots, ids, mask, segments, key, word_rows):
    h = encoder.apply({'params': params}, ids, mask, segments,
                      deterministic=bool(config.model.deterministic), rngs={'dropout': key},
                      word_rows=None if word_rows is None else word_rows(slots))
    return jnp.mean(h ** 2)

  def fn(state, batch):
    ids, mask, seg = batch['text_ids'], batch['text_mask'], batch['text_segments']
    key = jax.random.fold_in(state.rng, state.step)
    drop = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, ids.shape) & (mask > 0)
    ids_m = jnp.where(drop, tokens.BERT.unk, ids)
    rows, slots, rows_fn = None, None, [None, None]
    params = state.params
    if updates.row_wise(config.optim.get('embedding_rows', 'auto'), model.ops):
      # the rows only: the table's own updates are not part of this measurement
      rows, params, _ = embedding_rows.Rows.begin(state.params, state.opt_state, [ids, ids_m],
                                                  config.optim, 'batch',
                                                  embedding_rows.table_zero_updates)
      slots = rows.p
      rows_fn = [lambda s, part=part: rows.word_rows(s, part) for part in (0, 1)]
    grad = jax.value_and_grad(loss, argnums=(0, 1))
    l_t, g_t = grad(params['text_encoder'], slots, ids, mask, seg, jax.random.fold_in(key, 2),
                    rows_fn[0])
    l_s, g_s = grad(params['text_encoder'], slots, ids_m, mask, seg,
                    jax.random.fold_in(key, 3), rows_fn[1])
    g = jax.tree.map(jnp.add, g_t, g_s)
    return state.replace(step=state.step + 1), {'loss': l_t + l_s, 'grad_sum': sum(
        jnp.sum(x) for x in jax.tree.leaves(g))}
  return fn


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0)) if cost else 0.0


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax
  import numpy as np
  from cider_jax import backend, counterfactual, parallel, run_state, tokens
  from cider_jax.models.bert import BertConfig
  from cider_jax.spec import ModelSpec
  from cider_jax.train_step import train_step

  config = _CONFIG.value
  config.train.batch_size = _BATCH.value
  n_dev = _DEVICES.value or jax.local_device_count()
  parallel.check_batch(_BATCH.value, n_dev)
  bert_config = BertConfig(hidden_size=_HIDDEN.value, num_hidden_layers=_LAYERS.value,
                           num_attention_heads=_HEADS.value, intermediate_size=4 * _HIDDEN.value)
  lens = (50, 50, 50) if _ALIGNED.value else (50, 375, 500)
  spec = ModelSpec(lens, (5, 20), 3, _ALIGNED.value)
  rng = np.random.RandomState(0)
  consts = {'cls_feats': rng.randn(3, _HIDDEN.value + 25).astype(np.float32),
            'cls_probs': np.full((3,), 1 / 3, np.float32),
            'bias_table': counterfactual.bias_lookup_table(np.arange(1000, 1100), 30522)}
  model, tx, labels, state = run_state.init_state(config, spec, bert_config, consts)
  B, (L, La, Lv) = _BATCH.value, lens
  lengths = rng.randint(L // 2, L + 1, size=B)
  tm = (np.arange(L)[None] < lengths[:, None]).astype(np.float32)
  ids = rng.randint(1000, 30000, size=(B, L))
  ids[:, 0], ids[np.arange(B), lengths - 1] = tokens.BERT.cls, tokens.BERT.sep
  batch = {'text_ids': (ids * tm).astype(np.int32), 'text_mask': tm,
           'text_segments': np.zeros((B, L), np.int32),
           'audio': rng.randn(B, La, 5).astype(np.float32), 'audio_mask': np.ones((B, La), np.float32),
           'vision': rng.randn(B, Lv, 20).astype(np.float32), 'vision_mask': np.ones((B, Lv), np.float32),
           'label': rng.randint(0, 3, size=B).astype(np.int32), 'valid': np.ones(B, np.float32)}
  batch = parallel.shard(batch, n_dev)
  devices = jax.local_devices()[:n_dev]
  def timed_fn(m):
    """The function --part times, for model m."""
    if _PART.value == 'text_encoder':
      return _text_encoder_passes(config, m, bert_config)
    return functools.partial(train_step, model=m, tx=tx, labels=labels, config=config,
                             axis_name='batch')

  step = jax.pmap(timed_fn(model), axis_name='batch', devices=devices, donate_argnums=(0,))
  r_state = jax.pmap(lambda x: x, devices=devices)(
      jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n_dev,) + np.shape(x)), state))
  t0 = time.time()
  compiled = step.lower(r_state, batch).compile()
  compile_s = time.time() - t0
  flops = _flops(compiled)
  step = compiled  # calling the pmapped function again would compile it a second time
  for _ in range(max(_WARMUP.value, 1)):
    r_state, m = step(r_state, batch)
  jax.block_until_ready(m)
  if _PROFILE.value:
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0   # the timed steps are compiled: no Python frames to see
    jax.profiler.start_trace(_PROFILE.value, create_perfetto_trace=True, profiler_options=options)
  t0 = time.time()
  for _ in range(_STEPS.value):
    r_state, m = step(r_state, batch)
  jax.block_until_ready(m)
  if _PROFILE.value:
    jax.profiler.stop_trace()
  ms = (time.time() - t0) / _STEPS.value * 1000
  flops_source = 'XLA cost analysis'
  if model.ops.name == 'native':
    # XLA cannot see inside the native kernels: count the same work in its XLA form
    fn_xla = timed_fn(model.clone(base=model.base.clone(ops=backend.plain_ops())))
    flops = _flops(jax.pmap(fn_xla, axis_name='batch', devices=devices).lower(
        r_state, batch).compile())
    flops_source = 'XLA cost analysis of the same work with model.kernels=xla'
  platform = devices[0].platform
  peak, peak_source = _PEAK.value, '--peak_gflops'
  if not peak and platform == 'cpu':
    peak, peak_source = _matmul_gflops(devices), 'measured: float32 2048^3 matmul per device'
  out = {'ms_per_iter': round(ms, 2), 'samples_per_s': round(B / ms * 1000, 2),
         'compile_s': round(compile_s, 2),
         'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
         'device': f'{platform}:{devices[0].device_kind} x{n_dev}',
         'flops_per_iter': flops, 'flops_source': flops_source,
         'peak_gflops': round(peak, 1) if peak else None, 'peak_source': peak_source if peak else None,
         # three significant digits: a tiny run's fraction can be well below 0.001
         'fraction_of_peak': (float(f'{flops / (ms / 1000) / (peak * 1e9):.3g}') if peak and flops
                              else None),
         'batch': B, 'bert_hidden': _HIDDEN.value, 'bert_layers': _LAYERS.value,
         'bert_heads': _HEADS.value, 'aligned': _ALIGNED.value, 'dtype': config.model.dtype,
         'part': _PART.value, 'kernels': model.ops.name,
         'loss': float(np.asarray(m['loss'])[0])}
  print(json.dumps(out))


if __name__ == '__main__':
  app.run(main)
