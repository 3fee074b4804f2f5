"""The native in-place Adam update (kernels/adam.py, kernels.cc section 8) and its form
over the optimizer groups (kernels/adam.apply_update) against optax.

Reference 1: numpy float32 with optax's operations in their order (add_decayed_weights,
scale_by_adam, scale(−lr), p + u), each one correctly rounded. The kernel performs the same
operations without fused multiply-adds, so it must agree bit for bit.
Reference 2: optax's own jitted chain. XLA contracts some of its products and sums into fused
multiply-adds, so single elements differ by about one rounding of their largest term per
update: |Δ| ≤ 1e-6 · the array's largest magnitude, far below any wrong coefficient (b1 vs
1 − b1, a missing bias correction or weight decay change results by > 1e-3 relative).
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cider_jax import optim
from cider_jax.kernels import adam as native_adam
from tests.helpers import hlo

B1, B2, EPS = 0.9, 0.999, 1e-8
F = np.float32


def _numpy_adam(p, m, v, g, counts, lr, wd):
  """Float32 numpy: updates at step counts `counts` (1-based), gradient g for the first."""
  p, m, v = (np.array(a, F) for a in (p, m, v))
  for s, t in enumerate(counts):
    c1 = F(1) - F(B1) ** F(t)
    c2 = F(1) - F(B2) ** F(t)
    gs = np.array(g, F) if (s == 0 and g is not None) else np.zeros_like(p)
    if wd:
      gs = gs + F(wd) * p
    m = F(1 - B1) * gs + F(B1) * m
    v = F(1 - B2) * (gs * gs) + F(B2) * v
    p = p + F(-lr) * ((m / c1) / (np.sqrt(v / c2) + F(EPS)))
  return p, m, v


def _arrays(n, seed=0):
  rng = np.random.default_rng(seed)
  p = rng.normal(size=n).astype(F)
  m = (0.1 * rng.normal(size=n)).astype(F)
  v = (0.01 * rng.random(size=n)).astype(F)
  g = rng.normal(size=n).astype(F)
  return p, m, v, g


@jax.jit
def _corrections(counts):
  return jnp.stack([native_adam.bias_corrections(B1, B2, c) for c in counts])


# sizes: below one vector, vector tails, the single-call path, the pooled path with a tail
@pytest.mark.parametrize('shape', [(5,), (16,), (3, 37), (70007,), (300, 384)])
@pytest.mark.parametrize('wd', [0.0, 1e-3])
@pytest.mark.parametrize('steps,with_grad', [(1, True), (2, True), (2, False), (1, False)])
def test_adam_kernel_equals_float32_numpy_bit_for_bit(shape, wd, steps, with_grad):
  n = int(np.prod(shape))
  p, m, v, g = (a.reshape(shape) for a in _arrays(n))
  counts = [3, 4][:steps]
  coef = _corrections([jnp.int32(c) for c in counts])
  # numpy's b^t must match jnp's: compare the corrections first
  np.testing.assert_array_equal(
      np.asarray(coef), np.array([[F(1) - F(B1) ** F(t), F(1) - F(B2) ** F(t)] for t in counts]))
  got = jax.jit(lambda p, m, v, g, c: native_adam.update(
      p, m, v, g, c, b1=B1, b2=B2, eps=EPS, lr=5e-5, wd=wd))(
          p, m, v, g if with_grad else None, coef)
  want = _numpy_adam(p, m, v, g if with_grad else None, counts, 5e-5, wd)
  for name, a, b in zip('pmv', got, want):
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=name)
    assert a.shape == shape


def _config():
  return ml_collections.ConfigDict(dict(bert_lr=5e-5, bert_weight_decay=1e-3, lr=1e-3, b1=B1,
                                        b2=B2, eps=EPS))


def _params(seed=0):
  rng = np.random.default_rng(seed)
  a = lambda *s: jnp.asarray(rng.normal(size=s).astype(F))
  return {'text_encoder': {'embeddings': {'word_embeddings': {'embedding': jnp.zeros((0, 8))},
                                          'LayerNorm': {'scale': a(8), 'bias': a(8)}},
                           'layer': {'kernel': a(8, 300), 'bias': a(300)}},
          'wsam_a': {'kernel': a(5, 7)},
          'recon_text': {'kernel': a(8, 8), 'bias': a(8)},
          'mct': {'kernel': a(70, 1000), 'bias': a(1000)}}


@pytest.mark.parametrize('aligned', [False, True])
def test_native_apply_update_matches_optax_over_groups(aligned):
  """Three iterations of the train step's two updates (the first skips student_only);
  aligned data freezes WSAM. The (0, 8) placeholder passes through."""
  cfg = _config()
  params = _params()
  tx, labels = optim.make_optimizer(cfg, params, aligned)
  state = tx.init(params)

  def two_updates(params, state, g1, g2, native):
    update = native_adam.apply_update if native else optim.apply_update
    p1, s1 = update(tx, labels, params, g1, state, cfg=cfg, skip=('student_only',))
    return update(tx, labels, p1, g2, s1, cfg=cfg)

  ref = jax.jit(lambda *a: two_updates(*a, native=False))
  nat = jax.jit(lambda *a: two_updates(*a, native=True))
  rp, rs, np_, ns = params, state, params, state
  for it in range(3):
    g1, g2 = (jax.tree.map(lambda x: 0.1 * x, _params(10 * it + k)) for k in (1, 2))
    rp, rs = ref(rp, rs, g1, g2)
    np_, ns = nat(np_, ns, g1, g2)
  assert jax.tree.structure(ns) == jax.tree.structure(rs)
  for got, want in zip(jax.tree.leaves(ns), jax.tree.leaves(rs)):
    if np.issubdtype(np.asarray(want).dtype, np.integer):
      np.testing.assert_array_equal(got, want)   # step counts
    else:
      scale = float(np.max(np.abs(want), initial=0.0))
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * scale)
  for got, want, p0 in zip(jax.tree.leaves(np_), jax.tree.leaves(rp), jax.tree.leaves(params)):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(np.max(np.abs(want),
                                                                              initial=0.0)))
    assert got.shape == p0.shape
  # frozen stays exactly; the groups really moved
  if aligned:
    np.testing.assert_array_equal(np_['wsam_a']['kernel'], params['wsam_a']['kernel'])
  else:
    assert np.abs(np_['wsam_a']['kernel'] - params['wsam_a']['kernel']).max() > 1e-3
  assert np.abs(np_['recon_text']['kernel'] - params['recon_text']['kernel']).max() > 1e-3
  counts = {g: s.inner_state[optim.adam_state(s.inner_state)[0]].count
            for g, s in ns.inner_states.items() if g != 'frozen'}
  assert int(counts['student_only']) == 3 and int(counts['rest']) == 6


def test_adam_kernel_rejects_bad_shapes():
  p = jnp.zeros((4, 3))
  coef = jnp.ones((1, 2))
  kw = dict(b1=B1, b2=B2, eps=EPS, lr=1e-3)
  with pytest.raises(ValueError, match='moments'):
    native_adam.update(p, jnp.zeros((3, 4)), p, None, coef, **kw)
  with pytest.raises(ValueError, match='gradient'):
    native_adam.update(p, p, p, jnp.zeros((12,)), coef, **kw)
  with pytest.raises(ValueError, match='steps'):
    native_adam.update(p, p, p, None, jnp.ones((3, 2)), **kw)
  with pytest.raises(ValueError, match='float32'):
    native_adam.update(p.astype(jnp.bfloat16), p, p, None, coef, **kw)


@pytest.mark.parametrize('V,H,ids', [(40, 24, [3, 0, 39, 7, 40, 40]), (3000, 32, [5, 2999, 1])])
def test_gather_update_copies_rows_before_both_zero_gradient_updates(V, H, ids):
  p, m, v, _ = (a.reshape(V, H) for a in _arrays(V * H, seed=3))
  ids = np.array(ids, np.int32)   # V itself: an unused slot, clipped into the table
  coef = _corrections([jnp.int32(5), jnp.int32(6)])
  got = jax.jit(lambda *a: native_adam.gather_update(*a, b1=B1, b2=B2, eps=EPS, lr=5e-5,
                                                     wd=1e-3))(p, m, v, ids, coef)
  want = _numpy_adam(p, m, v, None, [5, 6], 5e-5, 1e-3)
  rows = np.minimum(ids, V - 1)
  for name, a, b in zip('pmv', got[:3], want):
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=name)
  for name, a, b in zip('pmv', got[3:], (p, m, v)):
    np.testing.assert_array_equal(np.asarray(a), b[rows], err_msg=name + ' rows')


def test_leading_unit_axis_form_under_pmap_gives_the_same_values():
  """lead=True (the train step's form under pmap) and lead=False agree, for both calls."""
  p, m, v, g = (a.reshape(1, 50, 30) for a in _arrays(1500, seed=4))
  ids = np.array([[4, 0, 49]], np.int32)
  coef = np.asarray(_corrections([jnp.int32(2), jnp.int32(3)]))[None]
  kw = dict(b1=B1, b2=B2, eps=EPS, lr=1e-3, wd=1e-3)

  def fn(p, m, v, g, ids, coef, lead):
    one = native_adam.update(p, m, v, g, coef[:1], lead=lead, **kw)
    return one + native_adam.gather_update(*one, ids, coef, lead=lead, **kw)

  outs = [jax.pmap(lambda *a, lead=lead: fn(*a, lead))(p, m, v, g, ids, coef)
          for lead in (True, False)]
  for a, b in zip(*outs):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert outs[0][6].shape == (1, 3, 30)   # the rows


@pytest.mark.parametrize('lead', [False, True])
def test_order_token_lets_the_update_run_in_place_without_copies(lead):
  """A read of p whose result feeds no gradient (as dx = dy·Wᵀ feeds only other parameters'
  gradients) is unordered with the update unless `after` carries it: XLA then copies p (and
  the result out again). With order_token of that read, the compiled step has no copy
  around the call; without it, it has (so the check can fail)."""
  shape = (64, 96)
  p, m, v, g = (a.reshape(shape) for a in _arrays(64 * 96, seed=5))
  x = np.ones((96, 8), F)
  coef = np.asarray(_corrections([jnp.int32(1)]))
  kw = dict(b1=B1, b2=B2, eps=EPS, lr=1e-3, wd=0.0)

  def step(params, grad, x, ordered):
    p, m, v = params
    y = p @ x                       # reads p; the gradient does not depend on it
    token = native_adam.order_token(y) if ordered else None
    new = native_adam.update(p, m, v, grad, coef, lead=lead, after=token, **kw)
    return new, jnp.sum(y)

  def compiled(ordered):
    fn = functools.partial(step, ordered=ordered)
    if lead:
      f = jax.pmap(fn, donate_argnums=(0,))
      args = ((p[None], m[None], v[None]), g[None], x[None])
    else:
      f = jax.jit(fn, donate_argnums=(0,))
      args = ((p, m, v), g, x)
    return f.lower(*args).compile(), args

  def copies(c):
    return hlo.copy_bytes_around_calls(c.as_text(), 'cider_adam')

  c, args = compiled(True)
  assert copies(c) == 0
  assert copies(compiled(False)[0]) > 0
  # and the values are the update's (reference 1)
  (np_p, np_m, np_v), s = c(*args)
  want = _numpy_adam(p, m, v, g, [1], 1e-3, 0.0)
  for a, b in zip((np_p, np_m, np_v), want):
    np.testing.assert_array_equal(np.asarray(a).reshape(shape), b)
  np.testing.assert_allclose(float(np.asarray(s).sum()), float((p @ x).sum()), rtol=1e-5)
