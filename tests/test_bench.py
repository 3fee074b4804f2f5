"""launch/bench.py prints one JSON line with the documented fields."""
import json
import os
import subprocess
import sys

import pytest

from cider_jax import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(part, *extra):
  r = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'bench.py'), '--bert_hidden',
                      '48', '--bert_layers', '1', '--bert_heads', '2', '--batch', '4',
                      '--steps', '1', '--warmup', '0', '--aligned', '--part', part, *extra],
                     capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert r.returncode == 0, r.stderr[-2000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize('part', ['step', 'text_encoder'])
def test_bench_counts_the_native_kernels_work(part):
  """XLA cannot see inside the native kernels (the tiny BERT's head size 24 has one): the
  count must be that of the same work in its XLA form, for the step and for --part."""
  native, xla = _bench(part, '--config.model.kernels=native'), _bench(
      part, '--config.model.kernels=xla')
  # the implementations' name (models.ops.Ops.name): the plain forms of this backend for xla
  assert native['kernels'] == 'native' and xla['kernels'] == backend.plain_ops().name
  assert native['flops_per_iter'] == xla['flops_per_iter']
  assert 'model.kernels=xla' in native['flops_source']


@pytest.mark.slow
@pytest.mark.parametrize('part', ['step', 'text_encoder'])
def test_bench_tiny_json_line(part):
  out = _bench(part, '--config.model.kernels=native')
  assert out['kernels'] == 'native'
  assert out['flops_source'] == 'XLA cost analysis of the same work with model.kernels=xla'
  for k in ('ms_per_iter', 'samples_per_s', 'compile_s', 'peak_rss_mb', 'device',
            'flops_per_iter'):
    assert k in out
  assert out['ms_per_iter'] > 0 and out['flops_per_iter'] > 0 and out['part'] == part
  # on CPU the float32 peak is measured in the same run (a 2048^3 matmul)
  assert out['peak_gflops'] > 1 and out['peak_source'].startswith('measured')
  assert 0 < out['fraction_of_peak'] == pytest.approx(
      out['flops_per_iter'] / (out['ms_per_iter'] / 1000) / (out['peak_gflops'] * 1e9), rel=0.01)
