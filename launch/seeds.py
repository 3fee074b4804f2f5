"""Train one config under several seeds and kernel forms; the test results as a distribution.

  python launch/seeds.py --config configs/quickstart.py --seeds 1111,2,3,4,5,6,7,8 \\
      --kernels native,xla --out runs/seeds [-- --config.train.num_epochs=14 ...]

Each run is `launch/train.py --config CFG --workdir OUT/KERNELS_SEED
--config.train.seed=SEED --config.model.kernels=KERNELS` plus any flags after `--`, one after
the other; a run whose `eval/report.json` exists is not run again, so the same command
continues an interrupted series. --previous SUMMARY.json (an earlier series' summary.json,
e.g. one kept in the repository) supplies the runs it holds instead of running them again, so a
series can be continued on another machine of the same kind; --summarize_only trains nothing
and summarises the runs finished so far. Then OUT/summary.json (every
run's figures and the machine it ran on) and OUT/summary.md (one row per run, then median and
min–max per kernel form and over all runs): test Non0_acc_2 (Acc_7 for 7-class) under RMFM
with complete input and at 50 % missing, factual and debiased, AUILC, the validation τ, the
best and the last epoch, the wall time.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = (('complete_factual', 'complete, factual'), ('complete_debiased', 'complete, debiased'),
           ('rmfm50_factual', '50 % RMFM, factual'), ('rmfm50_debiased', '50 % RMFM, debiased'),
           ('auilc_factual', 'AUILC, factual'), ('auilc_debiased', 'AUILC, debiased'))


def machine() -> str:
  """The CPU model, its wide vector and matrix extensions, and the cores this process may use,
  e.g. 'AMD EPYC (avx512f, avx512_bf16), 2 cores'."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      lines = f.read().splitlines()
    names = [l.split(':', 1)[1].strip() for l in lines if l.startswith('model name')]
    flags = next((l.split(':', 1)[1].split() for l in lines if l.startswith('flags')), [])
    wide = [x for x in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if x in flags]
    wide = [x for x in wide if not (x == 'avx2' and 'avx512f' in wide)]
    cpu = (names[0] if names else cpu) + (f' ({", ".join(wide)})' if wide else '')
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return f'{cpu}, {cores} cores'


def previous_runs(paths) -> dict:
  """{(kernels, seed): run record} from earlier summary.json files (later files win)."""
  out = {}
  for path in paths:
    try:
      with open(path) as f:
        runs = json.load(f)['runs']
    except (OSError, ValueError, KeyError, TypeError) as e:
      sys.exit(f'error: --previous {path}: not a summary.json written by launch/seeds.py ({e})')
    for r in runs:
      out[(r['kernels'], int(r['seed']))] = r
  return out


def run_figures(workdir: str) -> dict:
  """The figures of one finished run, from its eval/report.json and metrics.jsonl."""
  with open(os.path.join(workdir, 'eval', 'report.json')) as f:
    report = json.load(f)
  main = report['main_metric']
  rmfm = report['modes']['RMFM']
  half = rmfm['rates'].index(0.5)
  out = {'metric': main, 'tau': rmfm['tau'][0],
         'complete_factual': rmfm['factual'][main][0],
         'complete_debiased': rmfm['debiased'][main][0],
         'rmfm50_factual': rmfm['factual'][main][half],
         'rmfm50_debiased': rmfm['debiased'][main][half],
         'auilc_factual': rmfm['auilc']['factual'][main],
         'auilc_debiased': rmfm['auilc']['debiased'][main],
         'best_epoch': report['checkpoint']['best_epoch'],
         'best_valid': report['checkpoint']['best_valid']}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  out['epochs'] = max(r['epoch'] for r in records if 'valid' in r)
  stops = [r['early_stop'] for r in records if 'early_stop' in r]
  out['early_stop'] = stops[-1] if stops else None
  path = os.path.join(workdir, 'machine')
  out['machine'] = open(path).read().strip() if os.path.exists(path) else None
  return out


def summarize(runs: list) -> dict:
  """{group: {column: (median, min, max)}} over each kernel form and over all runs."""
  groups = {'all': runs}
  for r in runs:
    groups.setdefault(r['kernels'], []).append(r)
  return {g: {k: (statistics.median(r[k] for r in rs), min(r[k] for r in rs),
                  max(r[k] for r in rs)) for k, _ in COLUMNS} for g, rs in groups.items()}


def markdown(runs: list, summary: dict) -> str:
  lines = ['| kernels | seed | ' + ' | '.join(t for _, t in COLUMNS)
           + ' | τ | best epoch | epochs | wall s |',
           '| --- ' * (len(COLUMNS) + 6) + '|']
  for r in runs:
    lines.append(f'| {r["kernels"]} | {r["seed"]} | '
                 + ' | '.join(f'{r[k]:.3f}' for k, _ in COLUMNS)
                 + f' | {r["tau"]:.1f} | {r["best_epoch"]} | {r["epochs"]} | {r["wall_s"]:.0f} |')
  lines += ['', '| runs | n | ' + ' | '.join(t for _, t in COLUMNS) + ' |',
            '| --- ' * (len(COLUMNS) + 2) + '|']
  for g, cols in summary.items():
    n = len(runs) if g == 'all' else sum(r['kernels'] == g for r in runs)
    lines.append(f'| {g} | {n} | ' + ' | '.join(
        f'{m:.3f} ({lo:.3f}–{hi:.3f})' for m, lo, hi in (cols[k] for k, _ in COLUMNS)) + ' |')
  gains = [r['complete_debiased'] - r['complete_factual'] for r in runs]
  lines += ['', f'debiased − factual, complete input: min {min(gains):+.3f}, '
            f'median {statistics.median(gains):+.3f}, max {max(gains):+.3f}']
  machines = sorted({r.get('machine') or 'not recorded' for r in runs})
  lines += ['', 'machine: ' + '; '.join(machines)]
  return '\n'.join(lines) + '\n'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'quickstart.py'))
  parser.add_argument('--seeds', default='1111,2,3,4,5,6,7,8',
                      help='comma-separated train.seed values (default: %(default)s)')
  parser.add_argument('--kernels', default='native,xla',
                      help='comma-separated model.kernels values (default: %(default)s)')
  parser.add_argument('--out', required=True, help='folder of the runs and the summary')
  parser.add_argument('--previous', action='append', default=[], metavar='SUMMARY.json',
                      help="an earlier series' summary.json: its runs are used, not run again "
                      '(repeatable)')
  parser.add_argument('--summarize_only', action='store_true',
                      help='train nothing: summarise the runs finished so far (and --previous)')
  parser.add_argument('overrides', nargs='*', help='more launch/train.py flags, after --')
  args = parser.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(',')]
  kernels = args.kernels.split(',')
  earlier = previous_runs(args.previous)
  os.makedirs(args.out, exist_ok=True)
  runs = []
  for kern in kernels:
    for seed in seeds:
      workdir = os.path.join(args.out, f'{kern}_{seed}')
      done = os.path.join(workdir, 'wall_s')
      finished = os.path.exists(os.path.join(workdir, 'eval', 'report.json'))
      if not finished and (kern, seed) in earlier:
        runs.append(earlier[(kern, seed)])
        print(f'  {kern} seed {seed}: from --previous', flush=True)
        continue
      if not finished and args.summarize_only:
        print(f'  {kern} seed {seed}: not finished ({workdir}), left out', flush=True)
        continue
      if not finished:
        cmd = [sys.executable, os.path.join(ROOT, 'launch', 'train.py'), '--config', args.config,
               '--workdir', workdir, f'--config.train.seed={seed}',
               f'--config.model.kernels={kern}'] + args.overrides
        print(f'[{len(runs) + 1}/{len(seeds) * len(kernels)}] ' + ' '.join(cmd[1:]), flush=True)
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, 'machine'), 'w') as f:
          f.write(machine() + '\n')
        t0 = time.time()
        with open(os.path.join(workdir, 'train.log'), 'w') as log:
          rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if rc:
          sys.exit(f'error: the run {workdir} failed (exit {rc}); its output is in '
                   f'{workdir}/train.log')
        with open(done, 'w') as f:
          f.write(f'{time.time() - t0:.1f}\n')
      r = dict(run_figures(workdir), kernels=kern, seed=seed,
               wall_s=float(open(done).read()) if os.path.exists(done) else float('nan'))
      runs.append(r)
      print(f'  {kern} seed {seed}: complete {r["complete_factual"]:.3f} -> '
            f'{r["complete_debiased"]:.3f} (τ {r["tau"]:.1f}), best epoch {r["best_epoch"]} '
            f'of {r["epochs"]}', flush=True)
  if not runs:
    sys.exit(f'error: no finished run under {args.out} for these seeds and kernel forms')
  summary = summarize(runs)
  with open(os.path.join(args.out, 'summary.json'), 'w') as f:
    json.dump({'runs': runs, 'summary': summary}, f, indent=1)
  text = markdown(runs, summary)
  with open(os.path.join(args.out, 'summary.md'), 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  main()
