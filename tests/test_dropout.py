"""Counter-hash dropout: the statistics of nn.Dropout, a pure function of the key."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cider_jax.models.dropout import Dropout, hashed_bits, keep_mask


def _apply(rate, x, key, deterministic=False):
  return Dropout(rate).apply({}, x, deterministic, rngs={'dropout': key})


@pytest.mark.parametrize('rate', [0.1, 0.3, 0.5])
def test_keep_fraction_and_scaling(rate):
  x = jnp.ones((64, 150, 32))
  y = np.asarray(_apply(rate, x, jax.random.key(0)))
  kept = y != 0
  n = kept.size
  # binomial standard error sqrt(p(1-p)/n) is below 1e-3 here; 5 of them
  assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
  np.testing.assert_allclose(y[kept], 1 / (1 - rate), rtol=1e-6)


def test_pure_function_of_the_key():
  x = jnp.ones((8, 50, 16))
  a = _apply(0.2, x, jax.random.key(3))
  b = _apply(0.2, x, jax.random.key(3))
  c = _apply(0.2, x, jax.random.key(4))
  np.testing.assert_array_equal(a, b)
  assert np.mean(np.asarray(a) != np.asarray(c)) > 0.2  # independent masks differ on ~32 %


def test_deterministic_and_edge_rates():
  x = jax.random.normal(jax.random.key(1), (4, 10, 8))
  np.testing.assert_array_equal(_apply(0.5, x, jax.random.key(0), deterministic=True), x)
  np.testing.assert_array_equal(_apply(0.0, x, jax.random.key(0)), x)
  np.testing.assert_array_equal(_apply(1.0, x, jax.random.key(0)), jnp.zeros_like(x))


def test_bits_are_uniform_and_uncorrelated():
  bits = np.asarray(hashed_bits(jax.random.key(5), (1 << 18,)), np.uint64)
  n = bits.size
  # every bit position is set half of the time (5 standard errors of a fair coin)
  per_bit = np.array([((bits >> b) & 1).mean() for b in range(32)])
  assert np.all(np.abs(per_bit - 0.5) < 5 * 0.5 / np.sqrt(n)), per_bit
  # neighbouring elements are uncorrelated (consecutive counters)
  u = bits.astype(np.float64) / 2.0 ** 32
  r = np.corrcoef(u[:-1], u[1:])[0, 1]
  assert abs(r) < 5 / np.sqrt(n), r
  # two keys give unrelated streams, also shifted against each other
  other = np.asarray(hashed_bits(jax.random.key(6), (1 << 18,)), np.float64) / 2.0 ** 32
  for shift in (0, 1, 7):
    r = np.corrcoef(u[shift:], other[:n - shift])[0, 1]
    assert abs(r) < 5 / np.sqrt(n), (shift, r)


def test_keep_mask_threshold_matches_the_rate():
  m = np.asarray(keep_mask(jax.random.key(2), 0.25, (1 << 16,)))
  assert abs(m.mean() - 0.75) < 5 * np.sqrt(0.25 * 0.75 / m.size)


def test_dropout_inside_jit_and_grad():
  x = jnp.ones((4, 6))
  f = jax.jit(lambda x, k: jnp.sum(_apply(0.5, x, k)))
  g = jax.grad(f)(x, jax.random.key(0))
  y = _apply(0.5, x, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(g), np.asarray(y))  # gradient = mask / (1 - rate)
