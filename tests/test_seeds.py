"""launch/seeds.py: the figures of a finished run, and their distribution (by hand)."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'launch'))
import seeds  # noqa: E402  pylint: disable=g-import-not-at-top


def _finished_run(path, factual, debiased, stop=None):
  """A workdir with the parts of eval/report.json and metrics.jsonl that seeds.py reads."""
  os.makedirs(os.path.join(path, 'eval'))
  rates = [0.0, 0.5, 1.0]
  report = {'main_metric': 'Non0_acc_2',
            'checkpoint': {'best_epoch': 3, 'best_valid': 0.7},
            'modes': {'RMFM': {'rates': rates, 'tau': [0.9, 0.5, 0.0],
                               'factual': {'Non0_acc_2': [factual, factual - 0.1, 0.5]},
                               'debiased': {'Non0_acc_2': [debiased, debiased - 0.1, 0.5]},
                               'auilc': {'factual': {'Non0_acc_2': factual - 0.05},
                                         'debiased': {'Non0_acc_2': debiased - 0.05}}}}}
  with open(os.path.join(path, 'eval', 'report.json'), 'w') as f:
    json.dump(report, f)
  records = [{'step': 10, 'loss': 1.0}] + [{'epoch': e, 'valid': {}} for e in (1, 2, 3, 4)]
  if stop:
    records.append({'early_stop': stop, 'message': 'early stop'})
  with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in records))


def test_run_figures_and_their_distribution(tmp_path):
  runs = []
  for i, (kern, f, d) in enumerate([('native', 0.6, 0.7), ('native', 0.62, 0.76),
                                    ('xla', 0.64, 0.72)]):
    path = str(tmp_path / f'{kern}_{i}')
    _finished_run(path, f, d, stop={'epoch': 4} if i == 0 else None)
    runs.append(dict(seeds.run_figures(path), kernels=kern, seed=i, wall_s=100.0))
  r = runs[0]
  assert (r['complete_factual'], r['complete_debiased'], r['tau']) == (0.6, 0.7, 0.9)
  assert (r['rmfm50_factual'], r['rmfm50_debiased']) == pytest.approx((0.5, 0.6))
  assert (r['auilc_factual'], r['auilc_debiased']) == pytest.approx((0.55, 0.65))
  assert (r['best_epoch'], r['epochs'], r['early_stop']) == (3, 4, {'epoch': 4})
  assert runs[1]['early_stop'] is None
  summary = seeds.summarize(runs)
  assert summary['all']['complete_debiased'] == (0.72, 0.7, 0.76)   # median, min, max
  assert summary['native']['complete_factual'] == pytest.approx((0.61, 0.6, 0.62))
  assert summary['xla']['complete_debiased'] == (0.72, 0.72, 0.72)
  text = seeds.markdown(runs, summary)
  assert '| all | 3 | 0.620 (0.600–0.640) | 0.720 (0.700–0.760) |' in text
  assert 'min +0.080, median +0.100, max +0.140' in text


def test_previous_summary_supplies_runs_without_running_them(tmp_path, monkeypatch):
  """A series continued with --previous: a run finished in --out is read from its folder, one
  that only the earlier summary.json holds is taken from it, and nothing is trained (a training
  command here fails the test); the machine each ran on is in the summary."""
  out = tmp_path / 'out'
  _finished_run(str(out / 'native_1'), 0.6, 0.7)
  (out / 'native_1' / 'machine').write_text('CPU A, 2 cores\n')
  earlier = {'runs': [dict(seeds.run_figures(str(out / 'native_1')), kernels='native', seed=2,
                           wall_s=90.0, complete_debiased=0.8, machine='CPU B, 2 cores'),
                      dict(seeds.run_figures(str(out / 'native_1')), kernels='native', seed=1,
                           wall_s=90.0, complete_debiased=0.1)]}   # the folder's run wins
  prev = tmp_path / 'earlier.json'
  prev.write_text(json.dumps(earlier))

  def no_training(*a, **k):
    raise AssertionError(f'a run was started: {a}')
  monkeypatch.setattr(seeds.subprocess, 'call', no_training)
  seeds.main(['--seeds', '1,2', '--kernels', 'native', '--out', str(out), '--previous',
              str(prev)])
  summary = json.load(open(out / 'summary.json'))
  got = {(r['seed'], r['complete_debiased'], r['machine']) for r in summary['runs']}
  assert got == {(1, 0.7, 'CPU A, 2 cores'), (2, 0.8, 'CPU B, 2 cores')}
  assert summary['summary']['all']['complete_debiased'] == [0.75, 0.7, 0.8]
  assert 'machine: CPU A, 2 cores; CPU B, 2 cores' in open(out / 'summary.md').read()


def test_previous_that_is_not_a_summary_is_one_error_line(tmp_path):
  bad = tmp_path / 'bad.json'
  bad.write_text('[1, 2]')
  with pytest.raises(SystemExit, match='--previous .*bad.json: not a summary.json'):
    seeds.main(['--seeds', '1', '--out', str(tmp_path / 'o'), '--previous', str(bad)])


def test_machine_names_the_cpu_and_the_cores():
  name = seeds.machine()
  cores = len(os.sched_getaffinity(0))
  assert name.endswith(f', {cores} cores') and len(name) > len(f', {cores} cores')


def test_summarize_only_trains_nothing_and_leaves_out_unfinished_runs(tmp_path, monkeypatch,
                                                                       capsys):
  out = tmp_path / 'out'
  _finished_run(str(out / 'native_1'), 0.6, 0.7)
  os.makedirs(out / 'native_2')   # started, not finished

  def no_training(*a, **k):
    raise AssertionError(f'a run was started: {a}')
  monkeypatch.setattr(seeds.subprocess, 'call', no_training)
  seeds.main(['--seeds', '1,2', '--kernels', 'native', '--out', str(out), '--summarize_only'])
  assert f'native seed 2: not finished ({out / "native_2"}), left out' in capsys.readouterr().out
  summary = json.load(open(out / 'summary.json'))
  assert [r['seed'] for r in summary['runs']] == [1]
  with pytest.raises(SystemExit, match='no finished run'):
    seeds.main(['--seeds', '3', '--kernels', 'native', '--out', str(out), '--summarize_only'])
