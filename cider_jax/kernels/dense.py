"""A dense layer whose weight gradient is one native CPU kernel call (kernels.cc section 7).

The forward product x·w + b and the input cotangent dy·wᵀ stay with XLA; the parameter
cotangents dw = xᵀ·dy and db = Σ dy come from the kernel, which reads x and dy as they lie
(XLA would first copy one of them transposed and then run a general product).
"""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cider_jax.kernels import library
from cider_jax.kernels.library import f32


def weight_grad(x, dy):
  """x (M, K), dy (M, N), float32 → (xᵀ·dy (K, N), Σ_m dy (N,))."""
  if x.ndim != 2 or dy.ndim != 2 or x.shape[0] != dy.shape[0]:
    raise ValueError(f'weight_grad: x (M, K) and dy (M, N), got {x.shape} and {dy.shape}')
  K, N = x.shape[1], dy.shape[1]
  return jax.ffi.ffi_call('cider_weight_grad', (f32((K, N)), f32((N,))))(
      x.astype(jnp.float32), dy.astype(jnp.float32))


# The most weights (in × out) whose gradient the kernel computes with 16-lane (AVX-512)
# vectors (MiniLM's feed-forward layers), and with narrower ones (AVX2, NEON): above them
# XLA's product measured faster or was not measured (docs/performance.md, A/B results).
MAX_NATIVE_WEIGHTS = 384 * 1536
MAX_NATIVE_WEIGHTS_NARROW = 128 * 32


def max_native_weights() -> int:
  """The most weights whose gradient the kernel computes, for the vectors it was built with."""
  return MAX_NATIVE_WEIGHTS if library.vector_lanes() >= 16 else MAX_NATIVE_WEIGHTS_NARROW


def dense(x, kernel, bias=None):
  """x (..., K) · kernel (K, N) (+ bias (N,)) in float32, with the native weight gradient."""
  return _dense(x, kernel, *(() if bias is None else (bias,)))


@jax.custom_vjp
def _dense(x, kernel, *bias):   # bias: () or (bias,)
  y = jnp.dot(x, kernel)
  return y + bias[0] if bias else y


def _dense_fwd(x, kernel, *bias):
  return _dense(x, kernel, *bias), (x, kernel, bias)


def _dense_bwd(res, dy):
  x, kernel, bias = res
  rows = int(np.prod(x.shape[:-1], dtype=np.int64))
  dw, db = weight_grad(x.reshape(rows, x.shape[-1]), dy.reshape(rows, dy.shape[-1]))
  return (jnp.dot(dy, kernel.T), dw) + ((db,) if bias else ())


_dense.defvjp(_dense_fwd, _dense_bwd)


class Dense(nn.Module):
  """`nn.Dense(features)` in float32 (the same parameters, names and initialisers); its
  weight gradient comes from the native kernel up to max_native_weights() weights, from
  XLA's product above."""
  features: int
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features))
    bias = self.param('bias', self.bias_init, (self.features,)) if self.use_bias else None
    x = x.astype(jnp.float32)
    if kernel.size > max_native_weights():
      y = jnp.dot(x, kernel)
      return y if bias is None else y + bias
    return dense(x, kernel, bias)
