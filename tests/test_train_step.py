"""The MSSD step: device-count independence, torch-Adam step counts, gradient accumulation."""
import functools
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from cider_jax import run_state
from cider_jax.train_step import make_train_step
from tests.helpers import hlo, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'tests', 'helpers', 'multidevice_losses.py')
MULTIHOST = os.path.join(ROOT, 'tests', 'helpers', 'multihost_losses.py')


def _env(devices):
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              JAX_PLATFORMS='cpu')


def _start(devices, global_batch, *args):
  return subprocess.Popen([sys.executable, SCRIPT, str(global_batch), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=_env(devices), cwd=ROOT)


def _finish(proc):
  out, err = proc.communicate(timeout=900)
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run(devices, global_batch, *args):
  return _finish(_start(devices, global_batch, *args))


def _losses(proc):
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_same_losses(a, b, tol=1e-5):
  for step, (la, lb) in enumerate(zip(a['losses'], b['losses'])):
    assert la.keys() == lb.keys()
    for k in la:
      assert abs(la[k] - lb[k]) <= tol, (step, k, la[k], lb[k])


@pytest.fixture(scope='module')
def runs():
  """5 steps at global batch 8 on one process with 1 device, with 4, and with 4 and the dense
  table update, run side by side (each compiles mostly on one core)."""
  procs = {'one': _start(1, 8), 'four': _start(4, 8), 'four_dense': _start(4, 8, 'dense')}
  return {k: _losses(_finish(p)) for k, p in procs.items()}


def test_losses_do_not_depend_on_the_device_count(runs):
  """Dropout off, same global batch: 4 devices reproduce 1 device for 5 steps (≤ 1e-5).

  RMFM masks come from per-example keys (step, global index) and loss normalisers are summed
  over devices, so only float32 summation order differs.
  """
  a, b = runs['one'], runs['four']
  assert (a['devices'], b['devices']) == (1, 4)
  _assert_same_losses(a, b)
  # the masks change from step to step, so the student losses do too
  assert len({round(x['loss_rec_audio'], 6) for x in a['losses']}) == 5


def test_row_wise_embedding_update_on_four_devices_equals_the_dense_one(runs):
  """The table's rows from all devices' ids (all-gathered), against the dense gradient table
  summed over the devices: the same losses and table after 5 steps (float32 order only)."""
  four, dense = runs['four'], runs['four_dense']
  _assert_same_losses(four, dense, tol=1e-6)
  np.testing.assert_allclose(four['table'], dense['table'], rtol=0, atol=1e-7)
  # the table did move: 10 Adam updates of ≈ lr = 5e-5 each
  initial = run_state.init_state(tiny.config(), tiny.SPEC, tiny.TINY_BERT, tiny.consts())[3]
  table0 = jax.device_get(initial.params['text_encoder']['embeddings']['word_embeddings'][
      'embedding'])
  assert np.abs(np.asarray(dense['table']) - table0).max() > 1e-4


def test_two_processes_match_one_process(runs):
  """jax.distributed on localhost: 2 processes × 2 CPU devices, each feeding its half of every
  global batch, give the losses of 1 process × 4 devices (≤ 1e-5, summation order only)."""
  with socket.socket() as s:  # a free port for the coordinator
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, MULTIHOST, '8', str(i), '2', str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(2), cwd=ROOT) for i in range(2)]
  results = []
  for p in procs:
    results.append(_losses(_finish(p)))
  assert [(r['process'], r['processes'], r['devices'], r['local_devices']) for r in results] == [
      (0, 2, 4, 2), (1, 2, 4, 2)]
  for r in results:
    _assert_same_losses(r, runs['four'])


def test_batch_not_divisible_by_devices_is_a_clear_error():
  r = _run(4, 6)
  assert r.returncode != 0
  assert 'train.batch_size=6 must be a positive multiple of the number of devices (4)' in r.stderr


def _one_step(config, seed=0):
  model, tx, labels, state = run_state.init_state(config, tiny.SPEC, tiny.TINY_BERT, tiny.consts())
  before = jax.device_get(state)
  step = make_train_step(model, tx, labels, config, axis_name=None)
  new_state, metrics = step(state, tiny.batch(4, seed))
  return before, jax.device_get(new_state), metrics


def _adam_counts(opt_state):
  """{group: step count} of the multi_transform's Adam states."""
  out = {}
  for group, st in opt_state.inner_states.items():
    leaves = [x for x in jax.tree.leaves(st) if np.ndim(x) == 0 and np.issubdtype(np.asarray(x).dtype, np.integer)]
    if leaves:
      out[group] = int(leaves[0])
  return out


@pytest.fixture(scope='module')
def one_step():
  """One compiled step (with the counterfactual monitor on), shared by the tests below."""
  c = tiny.config()
  c.train.counterfactual_metrics = True
  return _one_step(c)


def test_teacher_update_skips_the_decoders(one_step):
  """torch Adam skips parameters outside the teacher loss: decoders are stepped once."""
  before, after, _ = one_step
  counts = _adam_counts(after.opt_state)
  assert counts['student_only'] == 1
  assert counts['rest'] == counts['bert_decay'] == counts['bert_no_decay'] == 2
  for name in ('recon_text', 'recon_audio', 'recon_vision', 'mct', 'gru_l'):
    assert not np.allclose(jax.tree.leaves(before.params[name])[0],
                           jax.tree.leaves(after.params[name])[0])


def test_padding_row_gets_no_gradient_but_weight_decay(one_step):
  before, after, _ = one_step
  emb0 = before.params['text_encoder']['embeddings']['word_embeddings']['embedding']
  emb1 = after.params['text_encoder']['embeddings']['word_embeddings']['embedding']
  # row 0: only the L2 term g = 1e-3·w drives Adam. Two textbook Adam updates in float64:
  w, m, v = emb0[0].astype(np.float64), 0.0, 0.0
  for t in (1, 2):
    g = 1e-3 * w
    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    w = w - 5e-5 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
  np.testing.assert_allclose(emb1[0], w, rtol=0, atol=5e-9)  # float32 ulp at |w| < 0.05


@pytest.mark.slow
def test_accumulated_teacher_gradient_changes_the_second_update():
  c_acc = tiny.config()
  c_alone = tiny.config()
  c_alone.train.accumulate_teacher_grad = False
  _, a, ma = _one_step(c_acc)
  _, b, mb = _one_step(c_alone)
  np.testing.assert_allclose(ma['loss'], mb['loss'], rtol=1e-6)  # same θ1, same student loss
  assert not np.allclose(a.params['mct']['ln_final']['scale'], b.params['mct']['ln_final']['scale'])


def test_counterfactual_metrics_in_the_step(one_step):
  """logp_cf are log-probabilities of the masked input's counterfactual pass, and the
  debiased accuracy is that of argmax(logp − train_tau · logp_cf): at τ 0 it is the factual
  acc_m; at τ 1e6 the counterfactual alone decides, so it is the share of examples whose
  least likely counterfactual class is the label (computed here from logp_cf)."""
  _, _, m = one_step
  logp_cf = np.asarray(m['logp_cf'], np.float64)
  assert logp_cf.shape == (4, 3)
  np.testing.assert_allclose(np.exp(logp_cf).sum(1), 1.0, atol=1e-5)
  y = tiny.batch(4, 0)['label']
  for tau in (0.0, 1e6):
    c = tiny.config()
    c.train.counterfactual_metrics = True
    c.maci.train_tau = tau
    _, _, mt = _one_step(c)
    # the same step otherwise: same counterfactual pass, same factual accuracy
    np.testing.assert_allclose(mt['logp_cf'], logp_cf, rtol=0, atol=1e-6)
    assert float(mt['acc_m']) == float(m['acc_m'])
    want = float(m['acc_m']) if tau == 0 else float(np.mean(np.argmin(logp_cf, 1) == y))
    assert float(mt['acc_m_debiased']) == pytest.approx(want, abs=1e-7)


def _steps(config, n=3):
  model, tx, labels, state = run_state.init_state(config, tiny.SPEC, tiny.TINY_BERT, tiny.consts())
  from cider_jax.train_step import train_step
  step = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, labels=labels, config=config,
                                         axis_name=None, return_grads=True))
  metrics = []
  for i in range(n):
    state, m = step(state, tiny.batch(8, seed=i))
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


# ~50 s each; the default run compares the two on four devices (runs fixture)
@pytest.mark.slow
@pytest.mark.parametrize('accumulate,clip', [(True, 0.0), (False, 1.0)])
def test_row_wise_embedding_update_equals_the_dense_one(accumulate, clip):
  """optim.embedding_rows (the default) against the dense table updates: 2 steps with the
  counterfactual pass, with and without the accumulated teacher gradient, with clipping
  active. The two sum a row's gradient in another order, and Adam turns that float32 noise in
  near-zero gradients of other parameters into different steps, so the moments and gradients
  are compared to 1e-5 of their largest value (a missing or doubled contribution to a row is
  of the order of that value), the table to 1e-7 (values ≤ 0.1)."""
  runs = {}
  for rows in (True, False):
    c = tiny.config()
    c.train.counterfactual_metrics = True
    c.train.accumulate_teacher_grad = accumulate
    c.optim.grad_clip = clip
    c.optim.embedding_rows = 'on' if rows else 'off'
    runs[rows] = _steps(c, 2)
  (s_r, m_r), (s_d, m_d) = runs[True], runs[False]
  path = ('text_encoder', 'embeddings', 'word_embeddings', 'embedding')
  get = lambda t: functools.reduce(lambda n, k: n[k], path, t)
  np.testing.assert_allclose(get(s_r.params), get(s_d.params), rtol=0, atol=1e-7)
  adam = lambda s: [x for x in s.opt_state.inner_states['bert_decay'].inner_state
                    if hasattr(x, 'mu')][0]
  close = lambda a, b, msg: np.testing.assert_allclose(a, b, rtol=0, err_msg=msg,
                                                      atol=1e-5 * np.abs(b).max())
  for moment in ('mu', 'nu'):
    close(get(getattr(adam(s_r), moment)), get(getattr(adam(s_d), moment)), moment)
  assert adam(s_r).count == adam(s_d).count == 4
  for a, b in zip(m_r, m_d):
    for k in ('loss', 'loss_task', 'grad_norm_teacher', 'grad_norm_student', 'acc_m_debiased'):
      np.testing.assert_allclose(a[k], b[k], rtol=2e-6, err_msg=k)
    for g_r, g_d in zip(a['grads'], b['grads']):
      close(get(g_r), get(g_d), 'table gradient')
  if clip:
    assert max(m['grad_norm_student'] for m in m_d) > clip   # the clipping acted


@pytest.mark.parametrize('axis_name', ['batch', pytest.param(None, marks=pytest.mark.slow)])
def test_native_adam_updates_run_in_place(axis_name):
  """Under the native kernels the compiled step (counterfactual pass on, pmapped or jitted)
  updates the parameters in their own buffers: the copies XLA adds around the Adam calls
  when a read of a parameter is unordered with its update (which once made it copy every
  parameter in and out, ≈ 2.2× their bytes) stay below 2 % of the parameter bytes (what
  remains are a few bias vectors, ≈ 0.4 %)."""
  c = tiny.config()
  c.train.counterfactual_metrics = True
  model, tx, labels, state = run_state.init_state(c, tiny.SPEC, tiny.TINY_BERT, tiny.consts())
  assert model.ops.name == 'native'
  step = make_train_step(model, tx, labels, c, axis_name=axis_name)
  b = tiny.batch(8)
  if axis_name:
    state, b = jax.tree.map(lambda x: np.asarray(x)[None], (state, b))
  text = step.lower(state, b).compile().as_text()
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(state.params))
  assert text.count('custom_call_target="cider_adam"') > 100
  assert hlo.copy_bytes_around_calls(text, 'cider_adam') < 0.02 * param_bytes
  assert hlo.copy_bytes_around_calls(text, 'cider_adam_gather') == 0
