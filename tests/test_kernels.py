"""cider_jax.kernels: the native CPU kernels against float64 math and the XLA forms.

References are written from the definitions in float64 numpy (scores s = q·kᵀ, softmax
statistics, their gradients derived by hand), independently of both implementations.
Tolerances: float32 sums of at most 150 terms of O(1) values, so ~1e-6 relative; 2e-5 leaves
room for the order of summation and the ~1-ulp exponential, and fails on any wrong term.
"""
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cider_jax import backend, configuration, losses
from cider_jax.kernels import attention as native
from cider_jax.kernels import gru as native_gru
from cider_jax.kernels import library
from cider_jax.kernels import ops as native_ops
from cider_jax.models import attention, gru
from cider_jax.models import ops as ops_lib
from configs import default
from tests.helpers import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL, ATOL = 2e-5, 2e-6


def test_kernels_build_here():
  ok, reason = library.available()
  assert ok, f'the native kernels need a C++17 compiler: {reason}'


def _block_reference(q, k, v, block_len):
  """float64: m, z (blocks, ..., T), n (blocks, ..., T, D)."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  ms, zs, ns = [], [], []
  for j in range(k.shape[-2] // block_len):
    keys = slice(j * block_len, (j + 1) * block_len)
    s = np.einsum('...qd,...kd->...qk', q, k[..., keys, :])
    m = s.max(-1)
    e = np.exp(s - m[..., None])
    ms.append(m)
    zs.append(e.sum(-1))
    ns.append(np.einsum('...qk,...kd->...qd', e, v[..., keys, :]))
  return np.stack(ms), np.stack(zs), np.stack(ns)


def _block_grad_reference(q, k, v, block_len, dz, dn):
  """float64 dq, dk, dv of Σ dz·z + Σ dn·n (m held constant)."""
  q, k, v, dz, dn = (np.asarray(t, np.float64) for t in (q, k, v, dz, dn))
  dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
  for j in range(k.shape[-2] // block_len):
    keys = slice(j * block_len, (j + 1) * block_len)
    s = np.einsum('...qd,...kd->...qk', q, k[..., keys, :])
    e = np.exp(s - s.max(-1, keepdims=True))
    ds = e * (np.einsum('...qd,...kd->...qk', dn[j], v[..., keys, :]) + dz[j][..., None])
    dq += np.einsum('...qk,...kd->...qd', ds, k[..., keys, :])
    dk[..., keys, :] = np.einsum('...qk,...qd->...kd', ds, q)
    dv[..., keys, :] = np.einsum('...qk,...qd->...kd', e, dn[j])
  return dq, dk, dv


def _close(actual, expected, what):
  expected = np.asarray(expected)
  scale = max(np.abs(expected).max(), 1e-30)
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=RTOL,
                             atol=ATOL * scale, err_msg=what)


# (leading dims, T, D, block_len): T not a multiple of the 16 vector lanes, several head
# sizes, one and two leading dims; the MCT's own case (150 queries, blocks of 50, D 4) last
CASES = [((2, 3), 21, 4, 7), ((5,), 15, 1, 5), ((2,), 33, 2, 11), ((1, 2), 48, 8, 16),
         ((3,), 9, 16, 3), ((2,), 6, 32, 2), ((4, 8), 150, 4, 50)]


@pytest.mark.parametrize('lead,T,D,block_len', CASES)
def test_block_stats_match_float64(lead, T, D, block_len):
  rng = np.random.default_rng(T * D)
  q, k, v = (rng.normal(size=lead + (T, D)).astype(np.float32) for _ in range(3))
  m, z, n = jax.jit(native.block_stats, static_argnums=3)(q, k, v, block_len)
  ref = _block_reference(q, k, v, block_len)
  for got, want, name in zip((m, z, n), ref, 'mzn'):
    assert got.shape == want.shape and got.dtype == jnp.float32
    _close(got, want, name)


@pytest.mark.parametrize('lead,T,D,block_len', CASES)
def test_block_stats_gradient_matches_float64_and_the_xla_form(lead, T, D, block_len):
  rng = np.random.default_rng(T * D + 1)
  q, k, v = (rng.normal(size=lead + (T, D)).astype(np.float32) for _ in range(3))
  blocks = T // block_len
  dz = rng.normal(size=(blocks,) + lead + (T,)).astype(np.float32)
  dn = rng.normal(size=(blocks,) + lead + (T, D)).astype(np.float32)

  def objective(stats_fn):
    def f(q, k, v):
      m, z, n = stats_fn(q, k, v)
      return sum(jnp.sum(dz[j] * z[j]) + jnp.sum(dn[j] * n[j]) for j in range(blocks))
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

  native_grads = objective(lambda q, k, v: native.block_stats(q, k, v, block_len))(q, k, v)
  ref = _block_grad_reference(q, k, v, block_len, dz, dn)
  for got, want, name in zip(native_grads, ref, ('dq', 'dk', 'dv')):
    _close(got, want, name)
  if len(lead) == 2 and blocks == 3:  # the XLA form takes (B, H, 3·block_len, D)
    xla_grads = objective(lambda q, k, v: attention.block_stats(q, k, v, block_len))(q, k, v)
    for got, want, name in zip(native_grads, xla_grads, ('dq', 'dk', 'dv')):
      _close(got, want, name + ' vs xla')


def test_block_stats_wide_score_range():
  """Scores spanning ~300 below the row max: exponentials down to underflow, then 0."""
  rng = np.random.default_rng(3)
  q = (rng.normal(size=(2, 30, 4)) * 6).astype(np.float32)
  k = (rng.normal(size=(2, 30, 4)) * 6).astype(np.float32)
  v = rng.normal(size=(2, 30, 4)).astype(np.float32)
  m, z, n = native.block_stats(q, k, v, 10)
  ref = _block_reference(q, k, v, 10)
  s = np.einsum('iqd,ikd->iqk', q.astype(np.float64), k.astype(np.float64))
  assert (s.max(-1, keepdims=True) - s).max() > 200
  for got, want, name in zip((m, z, n), ref, 'mzn'):
    _close(got, want, name)


def test_block_stats_nan_stays_in_its_item():
  rng = np.random.default_rng(4)
  q, k, v = (rng.normal(size=(3, 12, 4)).astype(np.float32) for _ in range(3))
  q[1, 5, 2] = np.nan
  m, z, n = (np.asarray(t) for t in native.block_stats(q, k, v, 4))
  assert np.isnan(z[:, 1, 5]).all() and np.isnan(n[:, 1, 5]).all()
  rows = np.ones((3, 12), bool)
  rows[1, 5] = False
  assert np.isfinite(z[:, rows]).all() and np.isfinite(n[:, rows]).all()


def _kl_reference(q_t, k_t, q_s, k_s, dkl):
  q_t, k_t, q_s, k_s, dkl = (np.asarray(t, np.float64) for t in (q_t, k_t, q_s, k_s, dkl))
  log_softmax = lambda s: s - s.max(-1, keepdims=True) - np.log(
      np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True))
  lt = log_softmax(np.einsum('...qd,...kd->...qk', q_t, k_t))
  ls = log_softmax(np.einsum('...qd,...kd->...qk', q_s, k_s))
  kl = (np.exp(lt) * (lt - ls)).sum(-1)
  ds = dkl[..., None] * (np.exp(ls) - np.exp(lt))
  return kl, np.einsum('...qk,...kd->...qd', ds, k_s), np.einsum('...qk,...qd->...kd', ds, q_s)


@pytest.mark.parametrize('lead,T,D', [((2, 3), 21, 4), ((4,), 17, 8), ((3,), 10, 1),
                                      ((2, 8), 150, 4), ((2,), 12, 32)])
def test_attention_kl_and_its_gradient_match_float64(lead, T, D):
  rng = np.random.default_rng(T + D)
  q_t, k_t, q_s, k_s = (rng.normal(size=lead + (T, D)).astype(np.float32) for _ in range(4))
  dkl = rng.normal(size=lead + (T,)).astype(np.float32)
  kl, vjp = jax.vjp(native.attention_kl, q_t, k_t, q_s, k_s)
  dq_t, dk_t, dq_s, dk_s = vjp(jnp.asarray(dkl))
  ref_kl, ref_dq, ref_dk = _kl_reference(q_t, k_t, q_s, k_s, dkl)
  _close(kl, ref_kl, 'kl')
  _close(dq_s, ref_dq, 'dq_student')
  _close(dk_s, ref_dk, 'dk_student')
  assert not np.asarray(dq_t).any() and not np.asarray(dk_t).any()  # the teacher is a constant


def _scores_form_kl(qk_t, qk_s, valid):
  """The KL loss from the formed (B, H, T, T) scores: KL(softmax(S_t) ‖ softmax(S_s)) over
  keys, summed, divided by B·heads; the teacher a constant."""
  scores = lambda q, k: jnp.einsum('bhqd,bhkd->bhqk', q, k)
  log_t = jax.nn.log_softmax(jax.lax.stop_gradient(scores(*qk_t)), axis=-1)
  log_s = jax.nn.log_softmax(scores(*qk_s), axis=-1)
  kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=(1, 2, 3))
  return jnp.sum(kl * valid), jnp.sum(valid) * qk_t[0].shape[1]


def test_attention_kl_qk_native_equals_the_scores_form():
  rng = np.random.default_rng(5)
  qk_t = tuple(jnp.asarray(rng.normal(size=(4, 2, 30, 4)).astype(np.float32)) for _ in range(2))
  qk_s = tuple(jnp.asarray(rng.normal(size=(4, 2, 30, 4)).astype(np.float32)) for _ in range(2))
  valid = jnp.asarray([1.0, 0.0, 1.0, 1.0])
  out = {}
  for kernel, rows_fn in (('native', native.attention_kl), ('xla', losses.attention_kl_rows)):
    f = lambda qk_s, rows_fn=rows_fn: losses.attention_kl(qk_t, qk_s, valid, rows_fn)[0]
    out[kernel] = jax.value_and_grad(f)(qk_s)
  out['scores'] = jax.value_and_grad(lambda qk_s: _scores_form_kl(qk_t, qk_s, valid)[0])(qk_s)
  assert losses.attention_kl(qk_t, qk_s, valid, native.attention_kl)[1] == 3 * 2
  assert _scores_form_kl(qk_t, qk_s, valid)[1] == 3 * 2
  for other in ('xla', 'scores'):
    _close(out['native'][0], out[other][0], 'loss vs ' + other)
    for a, b in zip(out['native'][1], out[other][1]):
      _close(a, b, 'gradient vs ' + other)


@pytest.mark.slow   # ~110 s; the fixture parity tests check both forms in the default run
def test_model_and_train_step_native_equal_xla():
  """The tiny CIDer (head size 8): gradients of task + distillation loss, and two train steps.

  Gradients are compared with an absolute tolerance scaled by the largest one: several
  parameters (key biases, pooling-score biases) have a zero gradient in exact arithmetic, so
  theirs is round-off of that scale. Parameters after a step are not compared leaf by leaf
  for the same reason: Adam's first update turns such round-off into ±learning rate.
  """
  from cider_jax import run_state
  from cider_jax.train_step import prototype_inputs, train_step
  b = tiny.batch(8)
  results = {}
  for kernel in ('native', 'xla'):
    config = tiny.config(deterministic=True)
    config.model.kernels = kernel
    model, tx, labels, state = run_state.init_state(config, tiny.SPEC, tiny.TINY_BERT,
                                                    tiny.consts())
    assert model.ops is (native_ops.NATIVE if kernel == 'native' else backend.plain_ops())
    feats, probs = prototype_inputs(tiny.consts(), 8)
    apply = lambda p, x: model.apply({'params': p}, x, feats, probs)
    rows_fn = native.attention_kl if kernel == 'native' else losses.attention_kl_rows
    x_m = dict(b, audio_mask=b['audio_mask'] * (np.arange(20) % 3 > 0))
    teacher = apply(state.params, b)

    def loss(p):
      out = apply(p, x_m)
      nll = losses.nll(out['logp'], b['label'], b['valid'])[0]
      kl = losses.attention_kl(teacher['attn_qk'], out['attn_qk'], b['valid'], rows_fn)[0]
      return nll + kl

    grads = jax.jit(jax.grad(loss))(state.params)
    step = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, labels=labels,
                                           config=config, axis_name=None))
    metrics = []
    for _ in range(2):
      state, m = step(state, b)
      metrics.append(m)
    results[kernel] = (grads, metrics)
  (g_n, m_n), (g_x, m_x) = results['native'], results['xla']
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g_x))
  for (path, a), b_ in zip(jax.tree_util.tree_leaves_with_path(g_n), jax.tree.leaves(g_x)):
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  for step_n, step_x in zip(m_n, m_x):
    for name in ('loss', 'loss_attn', 'loss_task', 'loss_task_m', 'loss_rep'):
      _close(step_n[name], step_x[name], name)
    assert float(step_n['loss_attn']) > 0


def _gru_reference(x, w_ih, w_hh, b_ih, b_hh):
  """float64 torch-convention GRU (gates r|z|n), zero initial state: (M, B, T, H)."""
  x, w_ih, w_hh, b_ih, b_hh = (np.asarray(t, np.float64) for t in (x, w_ih, w_hh, b_ih, b_hh))
  M, B, T, _ = x.shape
  H = w_hh.shape[1]
  sig = lambda a: 1 / (1 + np.exp(-a))
  h = np.zeros((M, B, H))
  out = np.zeros((M, B, T, H))
  for t in range(T):
    gx = np.einsum('mbe,meg->mbg', x[:, :, t], w_ih) + b_ih[:, None]
    gh = np.einsum('mbh,mhg->mbg', h, w_hh) + b_hh[:, None]
    r = sig(gx[..., :H] + gh[..., :H])
    z = sig(gx[..., H:2 * H] + gh[..., H:2 * H])
    n = np.tanh(gx[..., 2 * H:] + r * gh[..., 2 * H:])
    h = (1 - z) * n + z * h
    out[:, :, t] = h
  return out


# (M, B, T, E, H, scale): hidden sizes off the 16 vector lanes, the model's own (3, 32, 50,
# 32, 32); scale 4 drives the gates into saturation and tanh through both of its branches
GRU_CASES = [(2, 3, 7, 5, 5, 1.0), (1, 2, 4, 3, 20, 4.0), (3, 4, 9, 6, 16, 0.3),
             (3, 32, 50, 32, 32, 1.0)]


@pytest.mark.parametrize('M,B,T,E,H,scale', GRU_CASES)
def test_gru_matches_float64_and_its_gradient_the_scan(M, B, T, E, H, scale):
  rng = np.random.default_rng(M * 100 + H)
  bound = H ** -0.5 * scale
  x = (rng.normal(size=(M, B, T, E)) * scale).astype(np.float32)
  w_ih, w_hh = (rng.uniform(-bound, bound, size=(M, d, 3 * H)).astype(np.float32)
                for d in (E, H))
  b_ih, b_hh = (rng.uniform(-bound, bound, size=(M, 3 * H)).astype(np.float32) for _ in range(2))
  args = (x, w_ih, w_hh, b_ih, b_hh)
  hs = jax.jit(lambda *a: gru.gru(*a, recurrence_fn=native_gru.recurrence))(*args)
  _close(hs, _gru_reference(*args), 'states')
  weights = rng.normal(size=(M, B, T, H)).astype(np.float32)
  grads = {}
  for kernel, recurrence_fn in (('native', native_gru.recurrence), ('xla', gru.recurrence)):
    f = lambda *a, r=recurrence_fn: jnp.sum(gru.gru(*a, recurrence_fn=r) * weights)
    grads[kernel] = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))(*args)
  for got, want, name in zip(grads['native'], grads['xla'], ('dx', 'dw_ih', 'dw_hh', 'db_ih', 'db_hh')):
    _close(got, want, name)


def test_gru_recurrence_rejects_mismatched_shapes():
  gx = jnp.zeros((2, 3, 4, 12))
  with pytest.raises(Exception, match='disagree'):
    jax.block_until_ready(native_gru.recurrence(gx, jnp.zeros((2, 5, 15)), jnp.zeros((2, 15))))


def test_attention_kernel_resolution():
  assert backend.resolve('xla', 4) == 'xla'
  assert backend.resolve('auto', 4) == 'native'  # CPU backend, kernels built
  assert backend.resolve('auto', 12) == 'xla'
  assert backend.resolve('native', 4) == 'native'
  with pytest.raises(ValueError, match='head size 12'):
    backend.resolve('native', 12)
  with pytest.raises(ValueError, match='model.kernels'):
    backend.resolve('fast', 4)
  c = default.get_config()
  c.model.kernels = 'fast'
  with pytest.raises(ValueError, match='model.kernels'):
    configuration.validate(c, check_paths=False, check_devices=False)


def test_no_compiler_falls_back_with_a_note(tmp_path):
  """A failed build: available() says why, 'auto' uses xla with a note, 'native' is an error."""
  code = (
      'import sys\n'
      'from cider_jax.kernels import library\n'
      'from cider_jax import backend\n'
      'ok, reason = library.available()\n'
      'assert not ok and "could not build" in reason, reason\n'
      'assert backend.resolve("auto", 4) == "xla"\n'
      'try:\n'
      '  backend.resolve("native", 4)\n'
      '  sys.exit("native did not raise")\n'
      'except ValueError as e:\n'
      '  assert "could not build" in str(e), e\n'
      'print("checked")\n')
  env = dict(os.environ, CXX=str(tmp_path / 'no-such-compiler'),
             CIDER_JAX_KERNEL_CACHE=str(tmp_path / 'cache'), PYTHONPATH=ROOT,
             JAX_PLATFORMS='cpu')
  r = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                     cwd=ROOT, timeout=300)
  assert r.returncode == 0 and 'checked' in r.stdout, r.stdout + r.stderr
  assert 'note: model.kernels=auto uses xla' in r.stderr
  assert not any(p.suffix == '.so' for p in (tmp_path / 'cache').glob('*'))


def _load_in_subprocess(cache):
  env = dict(os.environ, CIDER_JAX_KERNEL_CACHE=str(cache), PYTHONPATH=ROOT)
  code = 'from cider_jax.kernels import library; assert library.available()[0]'
  subprocess.run([sys.executable, '-c', code], env=env, check=True, cwd=ROOT, timeout=300)


def test_cached_kernel_library_is_loaded_as_is(tmp_path):
  """A process that finds the library in its cache loads that file and builds nothing."""
  assert library.available()[0]
  built = library.cached_path(library._compiler())
  cached = tmp_path / os.path.basename(built)
  shutil.copy2(built, cached)
  before = cached.stat().st_mtime_ns
  _load_in_subprocess(tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == [cached.name]
  assert cached.stat().st_mtime_ns == before


@pytest.mark.slow
def test_kernel_library_is_built_once_then_cached(tmp_path):
  """The first use builds the library into an empty cache; a second process loads it as is."""
  for i in range(2):
    _load_in_subprocess(tmp_path)
    libs = list(tmp_path.glob('kernels-*.so'))
    assert len(libs) == 1
    if i == 0:
      first = libs[0].stat().st_mtime_ns
  assert libs[0].stat().st_mtime_ns == first


# ------------------------------------------------------------------ masked attention

def _hash_keep(seed, shape, threshold):
  """float64 keep mask of the hashed dropout, from its definition (models.dropout)."""
  def lowbias32(x):
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & np.uint64(0xFFFFFFFF)
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & np.uint64(0xFFFFFFFF)
    return x ^ (x >> np.uint64(16))
  index = np.arange(int(np.prod(shape)), dtype=np.uint64).reshape(shape)
  s0, s1 = (np.uint64(int(w)) for w in seed)
  bits = lowbias32(lowbias32((index + s0) & np.uint64(0xFFFFFFFF)) ^ s1)
  return (bits >= np.uint64(threshold)).astype(np.float64)


def _masked_reference(q, k, v, bias, keep, scale, keep_prob, dout, rows, cols):
  """float64 out (G, T, H, D) and dq, dk, dv of Σ dout·out; keep (G, H, T, S) 0/1.

  rows (G, T), cols (G, S) 0/1: rows with 0 output 0 (their dout does not count), keys with
  0 are not in the softmax; a row without keys outputs 0.
  """
  q, k, v, bias, dout = (np.asarray(t, np.float64) for t in (q, k, v, bias, dout))
  s = scale * np.einsum('gthd,gshd->ghts', q, k) + bias[:, None, None, :]
  s = np.where(cols[:, None, None, :] > 0, s, -np.inf)
  on = (rows > 0)[:, None, :, None] & (cols > 0).any(-1)[:, None, None, None]   # (G, 1, T, 1)
  s = np.where(on, s, 0.0)
  p = np.exp(s - s.max(-1, keepdims=True))
  p = np.where(on, p / p.sum(-1, keepdims=True), 0.0)
  w = p * keep / keep_prob
  out = np.einsum('ghts,gshd->gthd', w, v)
  dw = np.einsum('gthd,gshd->ghts', dout, v)
  dp = dw * keep / keep_prob
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  dq = scale * np.einsum('ghts,gshd->gthd', ds, k)
  dk = scale * np.einsum('ghts,gthd->gshd', ds, q)
  dv = np.einsum('ghts,gthd->gshd', w, dout)
  return out, (dq, dk, dv)


# (G, T, S, H, D, dropout rate, select): lengths off the 16 lanes, one and several heads, the
# BERT (12 heads of 32, 50 tokens, dropout 0.1) and WSAM (one head, 375 frames) shapes, the
# head size of bert-base (64);
# select: random row and key selections, with one group that has no key at all
MASKED_CASES = [(3, 7, 19, 3, 4, 0.3, True), (2, 21, 5, 2, 24, 0.0, False),
                (2, 50, 50, 12, 32, 0.1, False), (4, 50, 375, 1, 32, 0.0, True),
                (2, 17, 33, 4, 8, 0.5, True), (1, 3, 2, 1, 1, 0.0, False),
                (2, 13, 21, 2, 64, 0.2, True)]


@pytest.mark.parametrize('G,T,S,H,D,rate,select', MASKED_CASES)
def test_masked_attention_and_its_gradient_match_float64(G, T, S, H, D, rate, select):
  from cider_jax.models import dropout
  rng = np.random.default_rng(G * T * S + D)
  q, k, v = (rng.normal(size=(G, n, H, D)).astype(np.float32) for n in (T, S, S))
  valid = rng.random((G, S)) > 0.3
  valid[:, 0] = True
  # both forms of "masked" the model uses: BERT's finfo.min and WSAM's -1e30
  off = np.where(np.arange(G)[:, None] % 2 == 0, np.finfo(np.float32).min, -1e30)
  bias = np.where(valid, 0.0, off).astype(np.float32)
  rows, cols = np.ones((G, T), np.float32), np.ones((G, S), np.float32)
  if select:
    rows = (rng.random((G, T)) > 0.3).astype(np.float32)
    cols = (rng.random((G, S)) > 0.3).astype(np.float32)
    cols[0, :] = 0.0
    assert 0 < rows.mean() < 1 and 0 < cols[1:].mean() < 1
  seed = np.array([2654435761, 40503], np.uint32)
  thr = dropout.threshold(rate) if rate else 0
  keep_prob = float(np.float32(1.0 - rate))
  keep = _hash_keep(seed, (G, H, T, S), thr)
  if rate:
    assert 0.5 * rate < 1 - keep.mean() < 1.5 * rate   # the dropout is really on
  dout = rng.normal(size=(G, T, H, D)).astype(np.float32)
  scale = float(np.float32(D ** -0.5))
  out_ref, grads_ref = _masked_reference(q, k, v, bias, keep, scale, keep_prob, dout, rows, cols)
  fn = lambda q, k, v: native.masked_attention(
      q, k, v, jnp.asarray(bias), jnp.asarray(seed), scale, thr, keep_prob,
      rows=jnp.asarray(rows) if select else None, cols=jnp.asarray(cols) if select else None)
  out, vjp = jax.vjp(fn, *(jnp.asarray(t) for t in (q, k, v)))
  _close(out, out_ref, 'out')
  for name, g, g_ref in zip(('dq', 'dk', 'dv'), vjp(jnp.asarray(dout)), grads_ref):
    _close(g, g_ref, name)


def test_masked_attention_rejects_mismatched_shapes():
  q = jnp.ones((2, 5, 3, 4))
  k = jnp.ones((2, 6, 3, 4))
  with pytest.raises(Exception, match='bias'):
    native.masked_attention(q, k, k, jnp.zeros((2, 5)), jnp.zeros((2,), jnp.uint32), 1.0, 0, 1.0)
  with pytest.raises(Exception, match='disagree in G, H or D'):
    native.masked_attention(q, k[:, :, :2], k[:, :, :2], jnp.zeros((2, 6)),
                            jnp.zeros((2,), jnp.uint32), 1.0, 0, 1.0)
  with pytest.raises(Exception, match='rows must be'):
    native.masked_attention(q, k, k, jnp.zeros((2, 6)), jnp.zeros((2,), jnp.uint32), 1.0, 0,
                            1.0, rows=jnp.ones((2, 6)))


def test_bert_native_attention_equals_xla_with_dropout():
  """Same weights and dropout bits: the native kernel draws the seed words that the XLA
  form's Dropout module draws (same module path, same key)."""
  from cider_jax.models.bert import BertConfig, BertEncoder
  bc = BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=128, max_position_embeddings=32)
  B, L = 3, 21
  rng = np.random.RandomState(0)
  ids = jnp.asarray(rng.randint(1, 64, size=(B, L)))
  mask = jnp.asarray((np.arange(L)[None] < np.array([21, 9, 4])[:, None]).astype(np.float32))
  seg = jnp.zeros((B, L), jnp.int32)
  params = BertEncoder(bc).init(jax.random.PRNGKey(0), ids, mask, seg)['params']
  w = jnp.asarray(rng.randn(B, L, 64).astype(np.float32))
  results = {}
  for kernel, ops in (('native', native_ops.NATIVE), ('xla', ops_lib.CPU)):
    enc = BertEncoder(bc, ops=ops)
    def loss(p, enc=enc):
      h = enc.apply({'params': p}, ids, mask, seg, deterministic=False,
                    rngs={'dropout': jax.random.PRNGKey(5)})
      return jnp.sum(h * w), h
    results[kernel] = jax.jit(jax.grad(loss, has_aux=True))(params)
  (g_n, h_n), (g_x, h_x) = results['native'], results['xla']
  _close(h_n, h_x, 'hidden states')
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g_x))
  for (path, a), b_ in zip(jax.tree_util.tree_leaves_with_path(g_n), jax.tree.leaves(g_x)):
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  # and the dropout is on: another key changes the output
  other = BertEncoder(bc, ops=native_ops.NATIVE).apply({'params': params}, ids, mask, seg,
                                                      deterministic=False,
                                                      rngs={'dropout': jax.random.PRNGKey(6)})
  assert float(jnp.max(jnp.abs(other - h_n))) > 1e-2


def test_wsam_native_equals_xla_with_empty_rows_and_keys():
  from cider_jax.models.wsam import WSAM, wsam_rows
  B, L, Lo, E = 4, 9, 23, 32
  rng = np.random.RandomState(1)
  lens = np.array([9, 5, 3, 7])
  tmask = (np.arange(L)[None] < lens[:, None]).astype(np.float32)
  cols = (np.arange(Lo)[None] < np.array([23, 11, 1, 0])[:, None]).astype(np.float32)
  rows = wsam_rows(jnp.asarray(tmask), jnp.asarray(lens))
  t, o = rng.randn(B, L, E).astype(np.float32), rng.randn(B, Lo, E).astype(np.float32)
  params = WSAM(E).init(jax.random.PRNGKey(0), t, o, rows, cols)
  w = jnp.asarray(rng.randn(B, L, E).astype(np.float32))
  res = {}
  for kernel, ops in (('native', native_ops.NATIVE), ('xla', ops_lib.CPU)):
    f = lambda p, t, o, m=WSAM(E, ops): jnp.sum(m.apply(p, t, o, rows, cols) * w)
    res[kernel] = (WSAM(E, ops).apply(params, t, o, rows, cols),
                   jax.grad(f, argnums=(0, 1, 2))(params, t, o))
  _close(res['native'][0], res['xla'][0], 'out')
  bias = np.asarray(params['params']['out']['bias'])
  np.testing.assert_allclose(res['native'][0][3], np.broadcast_to(bias, (L, E)), atol=1e-6)
  # one absolute tolerance scaled by the largest gradient: the key bias's is zero in exact
  # arithmetic (a softmax ignores a shift of every score), round-off in both forms
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(res['xla'][1]))
  for a, b_ in zip(jax.tree.leaves(res['native'][1]), jax.tree.leaves(res['xla'][1])):
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5 * scale)


def _composite_reference(qkv, heads, block_len, scale, dout):
  """float64 out (B, T, 4E) of the composite attention and d qkv of Σ dout·out.

  Straight from the definition: for a query of block i and the p-th pattern of that block
  (attention.SUMMARY, attention.PATTERNS), a softmax of scale·q·k over the keys of the
  pattern's blocks.
  """
  from cider_jax.models.attention import PATTERNS, SUMMARY
  x = np.asarray(qkv, np.float64)
  B, T, E3 = x.shape
  E = E3 // 3
  D = E // heads
  hd = lambda t: t.reshape(B, T, heads, D).transpose(0, 2, 1, 3)   # (B, H, T, D)
  q, k, v = hd(scale * x[..., :E]), hd(x[..., E:2 * E]), hd(x[..., 2 * E:])
  s = np.einsum('bhtd,bhsd->bhts', q, k)
  block = np.arange(T) // block_len
  out = np.zeros((B, T, 4, heads, D))
  dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
  g = np.asarray(dout, np.float64).reshape(B, T, 4, heads, D).transpose(0, 3, 1, 2, 4)
  for i, name in enumerate('lav'):
    rows = block == i
    for slot, p in enumerate(SUMMARY[name]):
      keys = np.isin(block, ['LAV'.index(c) for c in PATTERNS[p]])
      si = s[:, :, rows][..., keys]
      w = np.exp(si - si.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      o = np.einsum('bhts,bhsd->bhtd', w, v[:, :, keys])
      out[:, rows, slot] = o.transpose(0, 2, 1, 3)
      go = g[:, :, rows, slot]
      dw = np.einsum('bhtd,bhsd->bhts', go, v[:, :, keys])
      ds = w * (dw - (dw * w).sum(-1, keepdims=True))
      dq[:, :, rows] += np.einsum('bhts,bhsd->bhtd', ds, k[:, :, keys])
      dk[:, :, keys] += np.einsum('bhts,bhtd->bhsd', ds, q[:, :, rows])
      dv[:, :, keys] += np.einsum('bhts,bhtd->bhsd', w, go)
  un = lambda t: t.transpose(0, 2, 1, 3).reshape(B, T, E)
  return out.reshape(B, T, 4 * E), np.concatenate([scale * un(dq), un(dk), un(dv)], -1)


# (B, block_len, E, heads, key spread): queries off the 16 lanes, head sizes 2 to 32, the
# MCT's own shape (blocks of 50, 8 heads of 4) last; spread > 1 scales block 1's keys so that
# the blocks' maxima differ by tens (each pattern must shift by its own blocks' maximum)
COMPOSITE_CASES = [(2, 5, 8, 2, 1.0), (3, 7, 24, 3, 1.0), (2, 3, 4, 2, 1.0), (2, 17, 32, 1, 1.0),
                   (2, 6, 16, 4, 25.0), (2, 50, 32, 8, 1.0)]


@pytest.mark.parametrize('B,L,E,H,spread', COMPOSITE_CASES)
def test_composite_attention_and_its_gradient_match_float64(B, L, E, H, spread):
  rng = np.random.default_rng(B * L * E + H)
  qkv = rng.normal(size=(B, 3 * L, 3 * E)).astype(np.float32)
  qkv[:, L:2 * L, E:2 * E] *= spread
  dout = rng.normal(size=(B, 3 * L, 4 * E)).astype(np.float32)
  scale = float(np.float32((E // H) ** -0.5))
  out_ref, grad_ref = _composite_reference(qkv, H, L, scale, dout)
  if spread > 1:   # the blocks' maxima really are far apart
    s = np.einsum('btd,bsd->bts', scale * qkv[..., :E // H], qkv[..., E:E + E // H])
    assert np.ptp(s[:, :, L:2 * L].max(-1) - s[:, :, :L].max(-1)) > 20
  out, vjp = jax.vjp(lambda x: native.composite_attention(x, H, L, scale), jnp.asarray(qkv))
  _close(out, out_ref, 'out')
  _close(vjp(jnp.asarray(dout))[0], grad_ref, 'dqkv')


def test_composite_attention_rejects_bad_shapes():
  with pytest.raises(Exception, match='3·block_len'):
    jax.block_until_ready(native.composite_attention(jnp.ones((2, 10, 24)), 2, 4, 1.0))
  with pytest.raises(Exception, match='heads must divide E'):
    jax.block_until_ready(native.composite_attention(jnp.ones((2, 12, 24)), 3, 4, 1.0))
  with pytest.raises(Exception, match='head size'):
    jax.block_until_ready(native.composite_attention(jnp.ones((2, 12, 36)), 4, 4, 1.0))


def _layer_norm_reference(x, scale, bias, dy, eps):
  """float64 LayerNorm over the last axis (variance about the mean) and the gradients of
  Σ dy·y in x, scale and bias."""
  x, scale, bias, dy = (np.asarray(t, np.float64) for t in (x, scale, bias, dy))
  mu = x.mean(-1, keepdims=True)
  rho = 1 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
  xh = (x - mu) * rho
  g = dy * scale
  dx = rho * (g - g.mean(-1, keepdims=True) - xh * (g * xh).mean(-1, keepdims=True))
  rows = tuple(range(x.ndim - 1))
  return xh * scale + bias, (dx, (dy * xh).sum(rows), dy.sum(rows))


# shapes: the MCT's (32, 150, 32); widths off the 16 lanes (20, 40, and 3, below one vector);
# fewer rows than the 16 partial sums; rows with a mean of 30 and a standard deviation of 2
@pytest.mark.parametrize('shape,offset', [((32, 150, 32), 0.0), ((5, 20), 3.0), ((2, 3, 40), 0.0),
                                          ((7, 3), 0.0), ((3, 16), 30.0)])
def test_layer_norm_and_its_gradient_match_float64(shape, offset):
  from cider_jax.kernels import norm
  rng = np.random.default_rng(sum(shape))
  x = (rng.normal(size=shape) * 2 + offset).astype(np.float32)
  scale, bias = (rng.normal(size=shape[-1:]).astype(np.float32) for _ in range(2))
  dy = rng.normal(size=shape).astype(np.float32)
  y_ref, grads_ref = _layer_norm_reference(x, scale, bias, dy, 1e-5)
  y, vjp = jax.vjp(lambda x, s, b: norm.layer_norm(x, s, b, 1e-5), *map(jnp.asarray, (x, scale, bias)))
  _close(y, y_ref, 'y')
  for name, g, g_ref in zip(('dx', 'dscale', 'dbias'), vjp(jnp.asarray(dy)), grads_ref):
    _close(g, g_ref, name)


def test_layer_norm_module_has_flax_parameters_and_rejects_bad_shapes():
  from cider_jax.kernels import norm
  import flax.linen as nn
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 8)).astype(np.float32))
  ours, theirs = norm.LayerNorm(1e-5), nn.LayerNorm(epsilon=1e-5)
  p = theirs.init(jax.random.key(0), x)
  assert jax.tree.map(np.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(np.shape, p)
  p = jax.tree.map(lambda a: a + jnp.arange(a.size, dtype=a.dtype).reshape(a.shape) / 10, p)
  _close(ours.apply(p, x), theirs.apply(p, x), 'module')
  with pytest.raises(Exception, match='scale and bias'):
    jax.block_until_ready(norm.layer_norm(x, jnp.ones(7), jnp.zeros(7), 1e-5))


# (M, K, N): the MCT's and WSAM's layers (4800 × 32 → 96, 12000 × 5 → 32); column counts off
# the 16 lanes and past one 64-column group (20, 33, 100); weight rows off the register
# blocks (13, 25, 129); fewer rows than one part (7, 1) and none (0); the last rows' vectors
# reaching past the end of dy (N = 5, 20); more than kWgSplitWeights weights, whose parts
# split dw's rows (300 × 250, 390 × 170)
DENSE_CASES = [(4800, 32, 96), (12000, 5, 32), (1600, 128, 32), (300, 13, 20), (257, 25, 33),
               (130, 129, 100), (7, 3, 5), (1, 4, 17), (0, 6, 16), (1000, 48, 192),
               (300, 300, 250), (61, 390, 170)]


@pytest.mark.parametrize('M,K,N', DENSE_CASES)
def test_weight_grad_matches_float64(M, K, N):
  from cider_jax.kernels import dense
  rng = np.random.default_rng(M + K + N)
  x = rng.normal(size=(M, K)).astype(np.float32)
  dy = rng.normal(size=(M, N)).astype(np.float32)
  dw, db = jax.jit(dense.weight_grad)(jnp.asarray(x), jnp.asarray(dy))
  x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
  # float32 sums of M products: within a few ulps of Σ|terms| (a missing or doubled term
  # is ~1/M of it, far outside)
  for got, ref, bound in ((dw, x64.T @ dy64, np.abs(x64).T @ np.abs(dy64)),
                          (db, dy64.sum(0), np.abs(dy64).sum(0))):
    assert got.shape == ref.shape
    np.testing.assert_array_less(np.abs(np.asarray(got, np.float64) - ref), 2e-6 * bound + 1e-12)


@pytest.mark.parametrize('use_bias,features', [(True, 24), (False, 24), (True, 400), (True, 800)])
def test_dense_module_equals_flax_dense_with_its_gradients(use_bias, features):
  """kernels.dense.Dense against nn.Dense: the same parameter tree, outputs and gradients in
  the parameters and the input (800 × 800 weights take XLA's weight gradient)."""
  from cider_jax.kernels import dense
  import flax.linen as nn
  K = features if features > 100 else 40
  x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 50, K)).astype(np.float32))
  g = jnp.asarray(np.random.default_rng(2).normal(size=(6, 50, features)).astype(np.float32))
  ours, theirs = dense.Dense(features, use_bias=use_bias), nn.Dense(features, use_bias=use_bias)
  p = theirs.init(jax.random.key(0), x)
  assert jax.tree.map(np.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(np.shape, p)
  loss = lambda m: lambda p, x: jnp.sum(m.apply(p, x) * g)
  _close(ours.apply(p, x), theirs.apply(p, x), 'y')
  got = jax.grad(loss(ours), argnums=(0, 1))(p, x)
  ref = jax.grad(loss(theirs), argnums=(0, 1))(p, x)
  # sums of 300 (or K) products of O(1) values: a few e-6 relative
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=5e-4), got, ref)


def test_vector_lanes_follow_the_cpu():
  """The library is built for this CPU's widest vector unit (16 lanes with AVX-512F, 8 with
  AVX, else 4), read from the built library itself."""
  from cider_jax.kernels import library
  flags = set()
  with open('/proc/cpuinfo') as f:
    for line in f:
      if line.startswith(('flags', 'Features')):
        flags |= set(line.split(':', 1)[1].split())
  expected = 16 if 'avx512f' in flags else 8 if 'avx' in flags else 4
  assert library.vector_lanes() == expected


@pytest.mark.parametrize('features', [24, 400])
def test_dense_module_takes_the_kernel_up_to_its_limit(features):
  """The native weight gradient is called up to max_native_weights() weights (384 × 1536
  with 16 lanes, 128 × 32 with fewer) and XLA's product above."""
  from cider_jax.kernels import dense
  x = jnp.ones((2, 5, features), jnp.float32)
  layer = dense.Dense(features)
  p = layer.init(jax.random.key(0), x)
  hlo = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x)))).lower(p).as_text()
  limit = 384 * 1536 if dense.library.vector_lanes() >= 16 else 128 * 32
  assert dense.max_native_weights() == limit
  assert ('cider_weight_grad' in hlo) == (features * features <= limit)


def test_weight_grad_rejects_mismatched_shapes():
  from cider_jax.kernels import dense
  with pytest.raises(ValueError, match='weight_grad'):
    dense.weight_grad(jnp.ones((5, 3)), jnp.ones((4, 2)))
  with pytest.raises(ValueError, match='weight_grad'):
    dense.weight_grad(jnp.ones((2, 5, 3)), jnp.ones((2, 5, 2)))
