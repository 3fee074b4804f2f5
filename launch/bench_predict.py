"""Time prediction with a trained run: loading, first call, one utterance, a batch of 256.

  python launch/bench_predict.py WORKDIR [--single 100] [--batch 256] [--repeats 5]
  python launch/bench_predict.py WORKDIR --buckets 256     # the batch as one padded program
  python launch/bench_predict.py WORKDIR --buckets 1,8,32  # ... in chunks of 32

Runs two fresh processes one after the other, sharing a persistent XLA cache that starts
empty (a new temporary folder, or --cache_dir): the first compiles, the second should load
the compiled programs. Each process builds cider_jax.Predictor(WORKDIR), then times the first
call on one utterance (compilation or cache load included), --single more calls of one
utterance each and a batch of --batch utterances (its first call, then --repeats more). Inputs
are short texts and random features of the run's widths (their values do not change the
time). --buckets: the Predictor's padded batch sizes (default its own, 1, 8, 64), to compare one
padded program for the whole batch with chunks of the largest bucket. Prints one JSON line per
process and a summary line with the medians and the first-call speed-up of the second process.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ('the film was wonderful and the acting warm', 'it was dull', 'i did not like the end',
         'a fine story told with care', 'nothing happened for an hour')


def child(args) -> dict:
  t0 = time.perf_counter()
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cider_jax import inference  # pylint: disable=g-import-not-at-top
  t_import = time.perf_counter() - t0
  buckets = (inference.DEFAULT_BUCKETS if not args.buckets
             else tuple(int(b) for b in args.buckets.split(',')))
  predictor = inference.Predictor(args.workdir, compilation_cache=args.cache_dir,
                                  buckets=buckets)
  t_load = time.perf_counter() - t0 - t_import
  (_, La, Lv), (Da, Dv) = predictor.spec.seq_lens, predictor.spec.feature_dims
  rng = np.random.RandomState(0)

  def sample(n):
    texts = [WORDS[i % len(WORDS)] for i in range(n)]
    audio = [rng.randn(rng.randint(La // 2, La + 1), Da) for _ in range(n)]
    vision = [rng.randn(rng.randint(Lv // 2, Lv + 1), Dv) for _ in range(n)]
    return texts, audio, vision

  def timed(n):
    x = sample(n)
    t = time.perf_counter()
    predictor(*x)
    return time.perf_counter() - t

  first = timed(1)
  to_first = time.perf_counter() - t0
  singles = [timed(1) for _ in range(args.single)]
  batch_first = timed(args.batch)
  batches = [timed(args.batch) for _ in range(args.repeats)]
  return {'import_s': round(t_import, 2), 'load_s': round(t_load, 2),
          'first_call_s': round(first, 3), 'start_to_first_result_s': round(to_first, 2),
          'single_ms_median': round(1e3 * float(np.median(singles)), 2),
          'single_ms_p90': round(1e3 * float(np.percentile(singles, 90)), 2),
          f'batch{args.batch}_first_s': round(batch_first, 2),
          f'batch{args.batch}_s_median': round(float(np.median(batches)), 3),
          'buckets': list(predictor.compiled_buckets), 'device': str(jax.devices()[0]),
          'kernels': predictor.config.model.kernels}


def main() -> int:
  parser = argparse.ArgumentParser(prog='python launch/bench_predict.py',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('workdir', help='a trained run (checkpoints/best, constants.npz)')
  parser.add_argument('--single', type=int, default=100, help='timed calls of one utterance')
  parser.add_argument('--batch', type=int, default=256, help='utterances in the batch call')
  parser.add_argument('--repeats', type=int, default=5, help='timed batch calls after the first')
  parser.add_argument('--cache_dir', default='', help='persistent XLA cache shared by the two '
                      'processes (default: a new temporary folder, removed afterwards)')
  parser.add_argument('--buckets', default='', help='comma-separated padded batch sizes of the '
                      'Predictor (default: its own, 1,8,64)')
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args)), flush=True)
    return 0
  if not os.path.isdir(os.path.join(args.workdir, 'checkpoints', 'best')):
    print(f'error: {args.workdir}: no checkpoints/best (a trained run is needed)',
          file=sys.stderr)
    return 1
  cache = args.cache_dir or tempfile.mkdtemp(prefix='cider_jax_bench_predict_')
  try:
    runs = []
    for k in (1, 2):
      cmd = [sys.executable, os.path.abspath(__file__), args.workdir, '--child',
             '--cache_dir', cache, '--single', str(args.single), '--batch', str(args.batch),
             '--repeats', str(args.repeats)]
      if args.buckets:
        cmd += ['--buckets', args.buckets]
      out = subprocess.run(cmd, capture_output=True, text=True)
      if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        print(f'error: process {k} failed (exit {out.returncode})', file=sys.stderr)
        return 1
      runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(json.dumps({'process': k, **runs[-1]}), flush=True)
  finally:
    if not args.cache_dir:
      shutil.rmtree(cache, ignore_errors=True)
  load = os.getloadavg()
  print(json.dumps({
      'summary': True,
      'single_ms_median': [r['single_ms_median'] for r in runs],
      f'batch{args.batch}_s_median': [r[f'batch{args.batch}_s_median'] for r in runs],
      'first_call_s': [r['first_call_s'] for r in runs],
      'first_call_speedup': round(runs[0]['first_call_s'] / runs[1]['first_call_s'], 1),
      'start_to_first_result_s': [r['start_to_first_result_s'] for r in runs],
      'loadavg_1_5_15': [round(x, 1) for x in load], 'cpus': os.cpu_count()}), flush=True)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
