"""The GRU recurrence as one native CPU kernel call (kernels.cc), forward and backward.

`recurrence(gx, w_hh, b_hh)` runs M GRUs over B sequences from a zero state, given the input
projections gx (M, B, T, 3H) (input bias included); models.cider.gru_scan is the XLA form
(a lax.scan, one small step per time step; here the whole recurrence is one call).
"""
import jax
import jax.numpy as jnp

from cider_jax.kernels.library import f32


@jax.custom_vjp
def recurrence(gx, w_hh, b_hh):
  """gx (M, B, T, 3H), w_hh (M, H, 3H), b_hh (M, 3H), float32 → states (M, B, T, H)."""
  return _forward(gx, w_hh, b_hh)[0]


def _forward(gx, w_hh, b_hh):
  M, B, T, G = gx.shape
  hs, ghs = jax.ffi.ffi_call('cider_gru_forward', (f32((M, B, T, w_hh.shape[1])),
                                                   f32((M, B, T, G))))(gx, w_hh, b_hh)
  return hs, (gx, w_hh, b_hh, hs, ghs)


def _backward(res, dhs):
  """The kernel gives d gx and the gradient dgh of each step's hidden part gh = b + h_prev W;
  W's and b's gradients are their sums over all items and steps (one contraction here)."""
  gx, w_hh, b_hh, hs, ghs = res
  dgx, dghs = jax.ffi.ffi_call('cider_gru_backward', (f32(gx.shape), f32(gx.shape)))(
      gx, w_hh, b_hh, hs, ghs, dhs)
  h_prev = jnp.pad(hs[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0)))
  return dgx, jnp.einsum('mbth,mbtg->mhg', h_prev, dghs), jnp.sum(dghs, axis=(1, 2))


recurrence.defvjp(_forward, _backward)
