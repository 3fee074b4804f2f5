"""The GRU of each modality (docs/model.md §2, step 4): one layer, torch's gate layout."""
import flax.linen as nn
import jax
import jax.numpy as jnp


class GRUWeights(nn.Module):
  """Parameters of a one-layer GRU, torch layout: gates r|z|n, separate input/hidden biases."""
  hidden: int

  @nn.compact
  def __call__(self, in_dim: int):
    H = self.hidden
    bound = H ** -0.5
    init = lambda k, s: jax.random.uniform(k, s, jnp.float32, -bound, bound)
    return (self.param('w_ih', init, (in_dim, 3 * H)), self.param('w_hh', init, (H, 3 * H)),
            self.param('b_ih', init, (3 * H,)), self.param('b_hh', init, (3 * H,)))


def recurrence(gx, w_hh, b_hh):
  """M independent GRUs over B sequences from a zero state, as one scan over time.

  gx (M, B, T, 3H): the input projections x·W_ih + b_ih; w_hh (M, H, 3H), b_hh (M, 3H)
  → hidden states (M, B, T, H).
  """
  H = w_hh.shape[1]

  def step(h, g):
    gh = jnp.einsum('mbh,mhg->mbg', h, w_hh) + b_hh[:, None, :]
    r = jax.nn.sigmoid(g[..., :H] + gh[..., :H])
    z = jax.nn.sigmoid(g[..., H:2 * H] + gh[..., H:2 * H])
    n = jnp.tanh(g[..., 2 * H:] + r * gh[..., 2 * H:])
    h = (1.0 - z) * n + z * h
    return h, h

  h0 = jnp.zeros(gx.shape[:2] + (H,), jnp.float32)
  _, hs = jax.lax.scan(step, h0, jnp.moveaxis(gx, 2, 0))   # (T, M, B, H)
  return jnp.moveaxis(hs, 0, 2)


def gru(x, w_ih, w_hh, b_ih, b_hh, recurrence_fn=recurrence):
  """x (M, B, T, E); w_ih (M, E, 3H), w_hh (M, H, 3H), b_ih / b_hh (M, 3H) → (M, B, T, H)."""
  gx = jnp.einsum('mbte,meg->mbtg', x, w_ih) + b_ih[:, None, None, :]
  return recurrence_fn(gx, w_hh, b_hh)
