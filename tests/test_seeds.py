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
