"""Dropout whose random bits come from a counter hash instead of a threefry stream.

`nn.Dropout` draws one threefry value per element, which is slow on the CPU (figures in
docs/performance.md). Here each call draws two 32-bit words from its flax 'dropout' key (one
small threefry call) and the element bits are a hash of the element index under those words
(`lowbias32`, two rounds); XLA fuses that into the masking. Same semantics as `nn.Dropout`:
keep with probability 1 − rate, kept values scaled by 1 / (1 − rate), a pure function of the
key. models.ops.CPU and the native kernels use it; the plain form is `nn.Dropout`.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _lowbias32(x):
  """An invertible 32-bit integer hash (C. Wellons' lowbias32) with full avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def seed_words(key) -> jax.Array:
  """The two uint32 words (s0, s1) of a dropout call, drawn from its key."""
  return jax.random.bits(key, (2,), jnp.uint32)


def threshold(rate: float) -> int:
  """Dropped when the bits are below this (rate · 2^32, at most 2^32 − 1)."""
  return min(int(round(rate * 2.0 ** 32)), (1 << 32) - 1)


def hashed_bits(key, shape) -> jax.Array:
  """uint32 bits of `shape`: element i gets h(h(i + s0) ^ s1), (s0, s1) = seed_words(key)."""
  size = int(np.prod(shape))
  if size >= 1 << 32:
    raise ValueError(f'hashed_bits: {size} elements do not fit a 32-bit counter')
  seed = seed_words(key)
  index = jax.lax.iota(jnp.uint32, size).reshape(shape)
  return _lowbias32(_lowbias32(index + seed[0]) ^ seed[1])


def keep_mask(key, rate: float, shape) -> jax.Array:
  """Bool mask of `shape`, True with probability 1 − rate (to 2^-32)."""
  return hashed_bits(key, shape) >= jnp.uint32(threshold(rate))


class Dropout(nn.Module):
  """Drop-in for `nn.Dropout(rate)(x, deterministic=...)`, random bits from `hashed_bits`."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    keep = keep_mask(self.make_rng('dropout'), self.rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(x))

  def seed(self) -> jax.Array:
    """The seed words that __call__ would draw (same module path, same key), for a kernel
    that applies this dropout itself (kernels.attention.masked_attention)."""
    return seed_words(self.make_rng('dropout'))
