"""Adam updates of one parameter array in place: one native CPU kernel call (kernels.cc
section 8) for what optax's add_decayed_weights → scale_by_adam → scale(−lr) and p + u do
in several passes over the parameter and its moments.

XLA runs the call in place only when every other read of the operands is ordered before it
and when they are the parameter buffers themselves; otherwise it copies them first.
- Order: pass as `after` an `order_token` of the values whose computation reads p (the
  kernel never reads the token's values, so NaN or inf there is harmless). Without it, W's
  own update does not depend on the backward product dx = dy·Wᵀ, which feeds only other
  parameters' gradients.
- Buffers: under pmap the per-device parameters are (1, ...) arrays, so pass `lead=True`
  there (the call then takes the (1, ...) forms, which XLA gives it without copies); under
  jit pass `lead=False`.
Neither changes the values.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from cider_jax import optim
from cider_jax.kernels.library import f32


def bias_corrections(b1: float, b2: float, count, scale=1.0):
  """(1 − b1^count, 1 − b2^count) as optax's bias_correction forms them (count: int32).

  scale: the learning-rate schedule's factor (optim.lr_factor, > 0). The kernel's step is
  −lr · (m / c1) / (√(v / c2) + eps), so dividing c1 by it multiplies the step by it: the
  scheduled rate reaches the kernel without a kernel operand of its own (exact up to one
  float32 rounding of c1 / scale)."""
  c1 = (1 - b1 ** count).astype(jnp.float32) / scale
  return jnp.stack([c1, (1 - b2 ** count).astype(jnp.float32)]).astype(jnp.float32)


def _check(p, mu, nu, grad, coef):
  if p.dtype != jnp.float32 or mu.shape != p.shape or nu.shape != p.shape:
    raise ValueError(f'adam update: float32 p with moments of its shape, got {p.dtype} '
                     f'{p.shape}, {mu.shape}, {nu.shape}')
  if grad is not None and grad.shape != p.shape:
    raise ValueError(f'adam update: gradient {grad.shape} for parameter {p.shape}')
  if coef.ndim != 2 or coef.shape[0] not in (1, 2) or coef.shape[1] != 2:
    raise ValueError(f'adam update: coef (steps, 2) with 1 or 2 steps, got {coef.shape}')


def order_token(*trees):
  """A small float32 vector that exists only once every array in `trees` does: one element
  of each (the `after` of update / gather_update)."""
  leaves = [x for x in jax.tree.leaves(trees) if x.size]
  if not leaves:
    return jnp.zeros((0,), jnp.float32)
  return jnp.stack([x.reshape(-1)[0].astype(jnp.float32) for x in leaves])


def _call(target, p, mu, nu, grad, coef, extra, extra_shapes, lead, b1, b2, eps, lr, wd,
          after):
  _check(p, mu, nu, grad, coef)
  after = jnp.zeros((0,), jnp.float32) if after is None else after.astype(jnp.float32)
  expand = (lambda x: x[None]) if lead else (lambda x: x)
  g = jnp.zeros((0,), jnp.float32) if grad is None else expand(grad.astype(jnp.float32))
  shape = f32(((1,) if lead else ()) + p.shape)
  out = jax.ffi.ffi_call(target, (shape,) * 3 + tuple(extra_shapes),
                         input_output_aliases={0: 0, 1: 1, 2: 2})(
      expand(p), expand(mu.astype(jnp.float32)), expand(nu.astype(jnp.float32)), g,
      coef.astype(jnp.float32), after.reshape(-1), *extra, b1=np.float32(b1), b2=np.float32(b2),
      c1=np.float32(1 - b1), c2=np.float32(1 - b2), eps=np.float32(eps),
      neg_lr=np.float32(-lr), wd=np.float32(wd))
  return tuple(x[0] for x in out[:3]) + tuple(out[3:]) if lead else tuple(out)


def update(p, mu, nu, grad, coef, *, b1: float, b2: float, eps: float, lr: float,
           wd: float = 0.0, lead: bool = False, after=None):
  """Adam updates of p (float32) and its moments; (new p, new mu, new nu).

  coef (steps, 2): the bias corrections of each update (`bias_corrections`), steps 1 or 2.
  grad: the first update's gradient (p's shape), or None: zero gradients (later updates
  always take zero gradients). wd: the L2 coefficient added to the gradient (0: none).
  lead, after (None or an `order_token`): see the module docstring.
  """
  return _call('cider_adam', p, mu, nu, grad, coef, (), (), lead, b1, b2, eps, lr, wd, after)


def gather_update(p, mu, nu, ids, coef, *, b1: float, b2: float, eps: float, lr: float,
                  wd: float = 0.0, lead: bool = False, after=None):
  """`update` with zero gradients of a table p (V, H), after copying out the rows `ids`
  (U,) int32 (clipped into the table) of p, mu and nu: (new p, new mu, new nu, p rows,
  mu rows, nu rows) with rows (U, H) as they were before the update."""
  if p.ndim != 2 or ids.ndim != 1 or p.shape[0] == 0:
    raise ValueError(f'adam gather: a non-empty table (V, H) and ids (U,), got {p.shape} '
                     f'and {ids.shape}')
  rows = f32((ids.shape[0], p.shape[1]))
  return _call('cider_adam_gather', p, mu, nu, None, coef, (ids.astype(jnp.int32),),
               (rows,) * 3, lead, b1, b2, eps, lr, wd, after)


def apply_update(tx, labels, params, grads, opt_state, *, cfg, skip=(), lead=False, after=(),
                 scale=1.0):
  """optim.apply_update with each parameter's Adam step one `update` call in place.

  cfg: config.optim (the groups' learning rates, L2 and betas); lead: True under pmap;
  after: other arrays computed from `params` (row gradients, a monitoring pass) that the
  in-place updates must follow; scale: the schedule's factor of the learning rates. tx is
  not run: its group structure and state are.
  """
  del tx
  # every read of a parameter (forward, and the backward product dy·Wᵀ that feeds only other
  # gradients) comes before its update in place: the calls follow all gradients
  token = order_token(grads, after)
  flat_p, flat_g = traverse_util.flatten_dict(params), traverse_util.flatten_dict(grads)
  flat_labels = traverse_util.flatten_dict(labels)
  new_p = dict(flat_p)
  for group, (lr, wd) in optim.adam_groups(cfg).items():
    if group in skip or group not in opt_state.inner_states:
      continue

    def step(adam, group=group, lr=lr, wd=wd):
      count = optax.safe_increment(adam.count)
      coef = bias_corrections(cfg.b1, cfg.b2, count, scale)[None]
      mu, nu = traverse_util.flatten_dict(adam.mu), traverse_util.flatten_dict(adam.nu)
      for path, label in flat_labels.items():
        if label != group or flat_p[path].size == 0:   # (0, H): a row-wise table's stand-in
          continue
        new_p[path], mu[path], nu[path] = update(
            flat_p[path], mu[path], nu[path], flat_g[path], coef, b1=cfg.b1, b2=cfg.b2,
            eps=cfg.eps, lr=lr, wd=wd, lead=lead, after=token)
      return adam._replace(count=count, mu=traverse_util.unflatten_dict(mu),
                           nu=traverse_util.unflatten_dict(nu))

    opt_state = optim.with_adam_state(opt_state, group, step)
  return traverse_util.unflatten_dict(new_p), opt_state


def table_zero_updates(table, mu, nu, ids, count, steps: int, *, cfg, group: str, lead=False,
                       scale=1.0):
  """embedding_rows.table_zero_updates in one `gather_update` call in place."""
  lr, wd = optim.adam_groups(cfg)[group]
  coefs, c = [], count
  for _ in range(steps):
    c = optax.safe_increment(c)
    coefs.append(bias_corrections(cfg.b1, cfg.b2, c, scale)[None])
  return gather_update(table, mu, nu, ids, jnp.concatenate(coefs), b1=cfg.b1, b2=cfg.b2,
                       eps=cfg.eps, lr=lr, wd=wd, lead=lead)
