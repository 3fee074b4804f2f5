"""launch/bench.py prints one JSON line with the documented fields."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize('part', ['step', 'text_encoder'])
def test_bench_tiny_json_line(part):
  r = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'bench.py'), '--bert_hidden',
                      '48', '--bert_layers', '1', '--bert_heads', '2', '--batch', '4',
                      '--steps', '1', '--warmup', '0', '--aligned', '--part', part],
                     capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  for k in ('ms_per_iter', 'samples_per_s', 'compile_s', 'peak_rss_mb', 'device',
            'flops_per_iter'):
    assert k in out
  assert out['ms_per_iter'] > 0 and out['flops_per_iter'] > 0 and out['part'] == part
  # on CPU the float32 peak is measured in the same run (a 2048^3 matmul)
  assert out['peak_gflops'] > 1 and out['peak_source'].startswith('measured')
  assert 0 < out['fraction_of_peak'] == pytest.approx(
      out['flops_per_iter'] / (out['ms_per_iter'] / 1000) / (out['peak_gflops'] * 1e9), rel=0.01)
