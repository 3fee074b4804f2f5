"""Numerical faults: a non-finite loss or gradient stops the run, gradient clipping."""
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from cider_jax import optim, train
from tests.test_end_to_end import ROOT, SMALL


def test_clip_by_global_norm_by_hand():
  grads = {'a': jnp.array([3.0, 0.0]), 'b': {'c': jnp.array([4.0])}}  # global norm 5
  clipped, norm = optim.clip_by_global_norm(grads, 1.0)
  assert float(norm) == pytest.approx(5.0, abs=1e-6)
  np.testing.assert_allclose(clipped['a'], [0.6, 0.0], atol=1e-6)  # scaled by 1/5
  np.testing.assert_allclose(clipped['b']['c'], [0.8], atol=1e-6)
  for max_norm in (10.0, 0.0):  # norm below the limit, or clipping off: unchanged
    same, norm = optim.clip_by_global_norm(grads, max_norm)
    np.testing.assert_array_equal(same['a'], grads['a'])
    assert float(norm) == pytest.approx(5.0, abs=1e-6)


def test_check_finite_names_the_step_and_every_term():
  train.check_finite(3, {'loss': 1.0, 'loss_kd': 0.5, 'grad_norm': 2.0, 'acc': float('nan')},
                     '/w/checkpoints')  # only loss / gradient terms are checked
  with pytest.raises(train.TrainingError) as e:
    train.check_finite(7, {'loss': float('nan'), 'loss_kd': 0.25, 'grad_norm': float('inf')},
                       '/w/checkpoints')
  msg = str(e.value)
  for part in ('step 7', 'loss=nan', 'loss_kd=0.25', 'grad_norm=inf', '/w/checkpoints/latest'):
    assert part in msg


def _train(workdir, cache, *extra):
  cmd = [sys.executable, os.path.join(ROOT, 'launch', 'train.py'), '--config',
         os.path.join(ROOT, 'configs', 'quickstart.py'), '--workdir', workdir,
         f'--config.train.compilation_cache={cache}', f'--config.data.cache_dir={cache}/data',
         *SMALL, '--config.eval.rates=(0.0,)', *extra]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  cache, w = str(tmp_path / 'cache'), str(tmp_path / 'run')
  first = _train(w, cache, '--config.train.num_epochs=1')
  assert first.returncode == 0, first.stderr[-3000:]
  latest = os.path.join(w, 'checkpoints', 'latest')
  steps = sorted(os.listdir(latest))
  # the same run, one more epoch, with a learning rate that overflows the weights
  second = _train(w, cache, '--config.train.num_epochs=2', '--config.optim.lr=1e38')
  assert second.returncode == 1
  assert 'resumed from' in second.stdout
  err = second.stderr.strip().splitlines()[-1]
  assert err.startswith('error: non-finite loss or gradient at step ') and 'loss=' in err, err
  assert sorted(os.listdir(latest)) == steps  # nothing written after the fault
  third = _train(w, cache, '--config.train.num_epochs=1')  # the kept checkpoint still loads
  assert third.returncode == 0, third.stderr[-3000:]
