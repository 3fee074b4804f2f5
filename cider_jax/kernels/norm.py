"""LayerNorm over the last axis as one native CPU kernel call (kernels.cc section 6), forward
and backward; flax.linen.LayerNorm is the XLA form (same parameters: scale γ, bias β)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cider_jax.kernels.library import f32

PARTS = 16   # kLnParts: row ranges whose partial dγ, dβ the backward pass returns


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float = 1e-5):
  """x (..., E), scale / bias (E,), float32: (x − mean) / sqrt(var + eps) · scale + bias, the
  variance taken about the mean in a second pass over each row (as torch)."""
  return _forward(x, scale, bias, eps)[0]


def _forward(x, scale, bias, eps):
  rows = int(np.prod(x.shape[:-1], dtype=np.int64))
  y, stats = jax.ffi.ffi_call('cider_layer_norm_forward', (f32(x.shape), f32((rows, 2))))(
      x, scale, bias, eps=np.float32(eps))
  return y, (x, scale, stats)


def _backward(eps, res, dy):
  x, scale, stats = res
  E = x.shape[-1]
  dx, dg, db = jax.ffi.ffi_call(
      'cider_layer_norm_backward', (f32(x.shape), f32((PARTS, E)), f32((PARTS, E))))(
          x, scale, stats, dy)
  return dx, dg.sum(axis=0), db.sum(axis=0)


layer_norm.defvjp(_forward, _backward)


class LayerNorm(nn.Module):
  """`nn.LayerNorm(epsilon)` (parameters scale and bias of the last axis) computed by the
  native kernel."""
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    E = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (E,))
    bias = self.param('bias', nn.initializers.zeros, (E,))
    return layer_norm(x.astype(jnp.float32), scale, bias, self.epsilon)
