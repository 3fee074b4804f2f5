"""cider_jax.models.matmul: bfloat16 operands, float32 accumulation, forward and backward."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cider_jax.models import matmul

BF16 = jnp.bfloat16


def _round(x):
  return np.asarray(jnp.asarray(x).astype(BF16).astype(jnp.float32), np.float64)


def test_float32_is_the_plain_dense():
  assert type(matmul.Dense(5)) is nn.Dense and matmul.Dense(5).dot_general is None


def test_transposed_specs():
  assert matmul._transposed_specs('aby,yz->abz') == ('abz,yz->aby', 'aby,abz->yz')


def test_bfloat16_dense_matches_rounded_reference():
  rng = np.random.RandomState(2)
  x = rng.randn(4, 7, 48).astype(np.float32)
  layer = matmul.Dense(16, BF16)
  params = layer.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias
  y, vjp = jax.vjp(lambda p, x: layer.apply(p, x), params, x)
  g = rng.randn(*y.shape).astype(np.float32)
  dp, dx = vjp(jnp.asarray(g))
  w, bias = params['params']['kernel'], params['params']['bias']
  xr, wr, gr = _round(x), _round(w), _round(g)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, xr @ wr + np.asarray(bias), atol=2e-5, rtol=0)
  np.testing.assert_allclose(dx, gr @ wr.T, atol=2e-5, rtol=0)
  np.testing.assert_allclose(dp['params']['kernel'], np.einsum('abi,abo->io', xr, gr),
                             atol=5e-5, rtol=0)
  np.testing.assert_allclose(dp['params']['bias'], g.sum((0, 1)), atol=2e-5, rtol=0)


def test_an_index_summed_within_one_operand_is_refused():
  with pytest.raises(ValueError, match='summed within it'):
    matmul._mixed_einsum('ij,jk->k', np.ones((2, 3)), np.ones((3, 4)), BF16)


@pytest.mark.parametrize('shape,features', [((1, 1), 1), ((5, 48), 16), ((2, 1, 3), 2),
                                            ((2, 3, 4, 8), 5), ((2, 50, 768), 3072),
                                            ((2, 50, 3072), 768)])
def test_bfloat16_dense_gradients_compile_and_run(shape, features):
  """Leading ranks 1-3 and BERT-base sizes: XLA:CPU runs every product (see the module doc)."""
  x = jnp.full(shape, 0.5)
  layer = matmul.Dense(features, BF16)
  params = layer.init(jax.random.PRNGKey(0), x)
  grads = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x) ** 2), argnums=(0, 1)))(
      params, x)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  # the values, from bfloat16-rounded operands in float64: y = x·W + b, dL/dy = 2y (rounded
  # to bfloat16 as the backward's operand), dL/dW = xᵀ·dy, dL/dx = dy·Wᵀ. A y element next
  # to a bfloat16 rounding boundary may round the other way (2^-8 relative), and float32
  # accumulation over up to 3072 terms adds ~1e-5: 1 % of the largest value covers both.
  w, bias = (np.asarray(params['params'][k], np.float64) for k in ('kernel', 'bias'))
  xr, wr = _round(np.asarray(x)), _round(w)
  dy = _round(2 * (xr @ wr + bias))
  want_w = xr.reshape(-1, xr.shape[-1]).T @ dy.reshape(-1, features)
  want_x = dy @ wr.T
  for got, want in ((grads[0]['params']['kernel'], want_w), (grads[1], want_x),
                    (grads[0]['params']['bias'], 2 * (xr @ wr + bias).reshape(-1, features).sum(0))):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                               atol=1e-2 * np.abs(want).max() + 1e-6)
