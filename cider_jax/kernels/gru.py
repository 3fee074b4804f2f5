"""The GRU recurrence as one native CPU kernel call (kernels.cc), forward and backward.

`recurrence(gx, w_hh, b_hh)` runs M GRUs over B sequences from a zero state, given the input
projections gx (M, B, T, 3H) (input bias included); models.cider.gru_scan is the XLA form
(a lax.scan, one small step per time step; here the whole recurrence is one call).
"""
import jax

from cider_jax.kernels.library import f32


@jax.custom_vjp
def recurrence(gx, w_hh, b_hh):
  """gx (M, B, T, 3H), w_hh (M, H, 3H), b_hh (M, 3H), float32 → states (M, B, T, H)."""
  return _forward(gx, w_hh, b_hh)[0]


def _forward(gx, w_hh, b_hh):
  M, B, T, _ = gx.shape
  hs = jax.ffi.ffi_call('cider_gru_forward', f32((M, B, T, w_hh.shape[1])))(gx, w_hh, b_hh)
  return hs, (gx, w_hh, b_hh, hs)


def _backward(res, dhs):
  gx, w_hh, b_hh, hs = res
  M, B = gx.shape[:2]
  dgx, dw, db = jax.ffi.ffi_call(
      'cider_gru_backward', (f32(gx.shape), f32((M * B,) + w_hh.shape[1:]),
                             f32((M * B, b_hh.shape[1]))))(gx, w_hh, b_hh, hs, dhs)
  return (dgx, dw.reshape((M, B) + w_hh.shape[1:]).sum(axis=1),
          db.reshape(M, B, -1).sum(axis=1))


recurrence.defvjp(_forward, _backward)
