"""Adam updates of one parameter array in place: one native CPU kernel call (kernels.cc
section 8) for what optax's add_decayed_weights → scale_by_adam → scale(−lr) and p + u do
in several passes over the parameter and its moments.
"""
import jax
import jax.numpy as jnp
import numpy as np

from cider_jax.kernels.library import f32


def bias_corrections(b1: float, b2: float, count):
  """(1 − b1^count, 1 − b2^count) as optax's bias_correction forms them (count: int32)."""
  return jnp.stack([1 - b1 ** count, 1 - b2 ** count]).astype(jnp.float32)


def update(p, mu, nu, grad, coef, *, b1: float, b2: float, eps: float, lr: float,
           wd: float = 0.0):
  """Adam updates of p (float32) and its moments; (new p, new mu, new nu).

  coef (steps, 2): the bias corrections of each update (`bias_corrections`), steps 1 or 2.
  grad: the first update's gradient (p's shape), or None: zero gradients (later updates
  always take zero gradients). wd: the L2 coefficient added to the gradient (0: none). The
  outputs reuse the inputs' buffers where XLA can give them up.
  """
  if p.dtype != jnp.float32 or mu.shape != p.shape or nu.shape != p.shape:
    raise ValueError(f'adam update: float32 p with moments of its shape, got {p.dtype} '
                     f'{p.shape}, {mu.shape}, {nu.shape}')
  if grad is not None and grad.shape != p.shape:
    raise ValueError(f'adam update: gradient {grad.shape} for parameter {p.shape}')
  if coef.ndim != 2 or coef.shape[0] not in (1, 2) or coef.shape[1] != 2:
    raise ValueError(f'adam update: coef (steps, 2) with 1 or 2 steps, got {coef.shape}')
  g = jnp.zeros((0,), jnp.float32) if grad is None else grad.astype(jnp.float32)
  shape = f32(p.shape)
  return jax.ffi.ffi_call('cider_adam', (shape, shape, shape),
                          input_output_aliases={0: 0, 1: 1, 2: 2})(
      p, mu.astype(jnp.float32), nu.astype(jnp.float32), g, coef.astype(jnp.float32),
      b1=np.float32(b1), b2=np.float32(b2), c1=np.float32(1 - b1), c2=np.float32(1 - b2),
      eps=np.float32(eps), neg_lr=np.float32(-lr), wd=np.float32(wd))
