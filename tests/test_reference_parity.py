"""The model against the original PyTorch code, through tests/fixtures (docs/model.md §6)."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cider_jax.compat import check_reference
from cider_jax.models import ops as ops_lib
from cider_jax.compat.reference import BUFFERS, flax_to_torch, infer_structure, torch_to_flax
from tests.helpers.fixtures import FIXTURES_DIR, MACI_FIXTURE, MODEL_FIXTURE_NAMES, model_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FIXTURES = model_fixtures()


def test_fixtures_present():
  """tests/fixtures holds the four model fixtures and maci_bias.npz, and no other .npz."""
  found = sorted(os.path.basename(f) for f in glob.glob(os.path.join(FIXTURES_DIR, '*.npz')))
  assert found == sorted(MODEL_FIXTURE_NAMES + (MACI_FIXTURE,)), found


def _fixture_kernels():
  """All four fixtures under the native kernels; under the plain-JAX forms (which compile
  about twice as slowly here) the unaligned 3-class one, which has WSAM, in the default run
  and the others with -m slow."""
  names = [os.path.basename(p) for p in MODEL_FIXTURES]
  default_xla = names.index('unaligned_binary.npz') if 'unaligned_binary.npz' in names else 0
  out = []
  for i, (path, name) in enumerate(zip(MODEL_FIXTURES, names)):
    out.append(pytest.param(path, 'native', id=f'{name}-native'))
    out.append(pytest.param(path, 'xla', id=f'{name}-xla',
                            marks=() if i == default_xla else pytest.mark.slow))
    # the plain forms of models.ops.PLAIN (chosen off the CPU): one masked softmax per
    # pattern, the three MCT output linears, the dense table update
    out.append(pytest.param(path, ops_lib.PLAIN, id=f'{name}-plain',
                            marks=() if i == default_xla else pytest.mark.slow))
  return out


@pytest.mark.parametrize('path,kernels', _fixture_kernels())
def test_check_reference_within_tolerance(path, kernels):
  diffs, failed, noise = check_reference.compare(path, kernels)
  assert not failed, {k: diffs[k] for k in failed}
  assert noise['rule'] == 'original'  # the fixtures hold the original's gradients
  z = np.load(path)
  # every output, loss and parameter of the fixture was compared
  expected = {k for k in z.files if k.startswith(('output/', 'loss/'))}
  expected |= {k for k in z.files if k.startswith('param_after_step/')
               and k.split('/', 1)[1] not in BUFFERS}
  assert expected <= set(diffs)
  # outputs and losses: float32 on these sizes agrees to ~1e-6; the bound is 1e-4
  assert max(v for k, v in diffs.items() if k.startswith(('output/', 'loss/'))) < 1e-4
  normal = [v for k, v in diffs.items()
            if k.startswith('param_after_step/') and not k.endswith('_small_grad')]
  assert max(normal) <= 1e-5


def test_adam_step_bound_by_hand():
  # t = 2, betas (0.9, 0.999): a = (0.09, 0.1) / 0.19, c = (0.000999, 0.001) / 0.001999,
  # Σ a²/c = 0.448979 + 0.553739 = 1.002718, whose square root is 1.001358
  assert check_reference.adam_step_bound(0.9, 0.999, 1) == pytest.approx(1.0, abs=1e-12)
  assert check_reference.adam_step_bound(0.9, 0.999, 2) == pytest.approx(1.001358, abs=1e-6)
  assert check_reference.noise_tolerance(1e-3, 0.9, 0.999, (1, 2)) == pytest.approx(
      2e-3 * 2.001358, abs=1e-9)


def test_adam_step_bound_holds_and_is_reached():
  """|m̂_t| / sqrt(v̂_t) of torch's Adam recursion over random gradient pairs (any scale)
  stays below the bound, and the Cauchy-Schwarz extremal pair g_i ∝ a_i / c_i reaches it."""
  b1, b2 = 0.9, 0.999
  bound = check_reference.adam_step_bound(b1, b2, 2)

  def ratio(g):
    m = v = 0.0
    for x in g:
      m, v = b1 * m + (1 - b1) * x, b2 * v + (1 - b2) * x * x
    return abs(m / (1 - b1 ** len(g))) / np.sqrt(v / (1 - b2 ** len(g)))

  rng = np.random.default_rng(0)
  worst = max(ratio(rng.standard_normal(2) * 10.0 ** rng.uniform(-9, 0, 2)) for _ in range(2000))
  assert 1.0 < worst <= bound + 1e-12
  a = np.array([(1 - b1) * b1, 1 - b1]) / (1 - b1 ** 2)
  c = np.array([(1 - b2) * b2, 1 - b2]) / (1 - b2 ** 2)
  assert ratio(a / c) == pytest.approx(bound, rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize('path', MODEL_FIXTURES[:1], ids=os.path.basename)
def test_check_reference_cli(path):
  r = subprocess.run([sys.executable, '-m', 'cider_jax.compat.check_reference', path,
                      '--kernels=xla'], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  last = json.loads(lines[-1])
  assert 'output/full/pred' in last and 'loss/loss_task' in last
  assert all(isinstance(v, float) for v in last.values())
  noise = json.loads(lines[-2])
  assert noise['noise_rule'] == 'original'
  z = np.load(path)
  # one count per compared parameter: the elements whose gradient is below 1e-6 in the
  # original's teacher or second update (the second only, for the student-only recon_*)
  for name, count in noise['noise_elements'].items():
    small = np.abs(z[f'grad_second/{name}']) < 1e-6
    if not name.startswith('recon_'):
      small |= np.abs(z[f'grad_teacher/{name}']) < 1e-6
    assert count == int(small.sum()), name
  assert "judged from the original's gradients" in r.stderr


def test_check_reference_detects_a_wrong_parameter(tmp_path):
  small = min(MODEL_FIXTURES, key=os.path.getsize)
  z = dict(np.load(small))
  z['param/proj1.bias'] = z['param/proj1.bias'] + 1e-2
  bad = tmp_path / 'bad.npz'
  np.savez(bad, **z)
  diffs, failed, _ = check_reference.compare(str(bad))
  assert 'output/full/pred' in failed


def _hide_a_gradient(z):
  """The fixture as a cider_jax that drops gradients would meet it: elements of proj1.bias
  whose gradient is exactly 0 in the original's run (and in cider_jax's, which matches it)
  are given a real gradient there, and moved by 2·lr as the original's two Adam steps would."""
  z = dict(z)
  name, lr = 'proj1.bias', json.loads(str(z['meta_json']))['adam']['lr']
  dead = (z[f'grad_teacher/{name}'] == 0) & (z[f'grad_second/{name}'] == 0)
  assert dead.sum() >= 1
  for k in ('grad_teacher', 'grad_second'):
    z[f'{k}/{name}'] = np.where(dead, np.float32(1e-2), z[f'{k}/{name}'])
  z[f'param_after_step/{name}'] = z[f'param_after_step/{name}'] - np.where(
      dead, np.float32(2 * lr), np.float32(0))
  return z, name, int(dead.sum())


def test_a_gradient_the_original_has_and_cider_jax_lacks_fails_the_check(tmp_path):
  path = os.path.join(FIXTURES_DIR, 'unaligned_binary.npz')
  z, name, n_dead = _hide_a_gradient(np.load(path))
  bad = tmp_path / 'hidden.npz'
  np.savez(bad, **z)
  diffs, failed, noise = check_reference.compare(str(bad), 'native')
  assert noise['rule'] == 'original'
  assert f'param_after_step/{name}' in failed
  assert diffs[f'param_after_step/{name}'] == pytest.approx(2e-3, rel=1e-3)
  # judged by cider_jax's own gradients (the fallback for fixtures without grad_*), the same
  # elements count as noise, allowed about 4·lr, and the dropped gradient goes unseen
  old = tmp_path / 'old_format.npz'
  np.savez(old, **{k: v for k, v in z.items() if not k.startswith('grad_')})
  diffs, failed, noise = check_reference.compare(str(old), 'native')
  assert noise['rule'] == 'cider_jax' and not failed
  assert noise['elements'][name] >= n_dead


def test_check_reference_bad_file(tmp_path):
  p = tmp_path / 'x.npz'
  p.write_text('not a fixture')
  r = subprocess.run([sys.executable, '-m', 'cider_jax.compat.check_reference', str(p)],
                     capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 2 and 'not a fixture' in r.stderr and 'Traceback' not in r.stderr


def test_check_reference_rejects_an_unknown_kernels_choice():
  r = subprocess.run([sys.executable, '-m', 'cider_jax.compat.check_reference', MODEL_FIXTURES[0],
                      '--kernels', 'fast'], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 2 and 'usage' in r.stderr and 'Traceback' not in r.stderr


@pytest.mark.parametrize('path', MODEL_FIXTURES, ids=os.path.basename)
def test_converter_round_trip_exact(path):
  z = np.load(path)
  state = {k[len('param/'):]: z[k] for k in z.files if k.startswith('param/')}
  _, _, cross = infer_structure(state)
  back = flax_to_torch(torch_to_flax(state), cross_dataset=cross)
  assert set(back) == set(state)
  for k, v in state.items():
    if k in BUFFERS:
      continue  # regenerated constants
    np.testing.assert_array_equal(back[k], v, err_msg=k)
