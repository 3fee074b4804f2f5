"""Loss terms of docs/model.md §4, each as (numerator, denominator).

The caller divides by the denominator summed over all devices, so a loss (and its gradient)
is the same for a global batch whatever the number of devices it is split over. `valid`
(B,) weights exclude padded examples.
"""
import jax
import jax.numpy as jnp


def nll(logp, labels, valid):
  """Negative log-likelihood. logp (B, C), labels (B,) int, valid (B,)."""
  picked = jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=1)[:, 0]
  return -jnp.sum(picked * valid), jnp.sum(valid)


def representation(z_student, z_teacher, valid, eps=1e-8):
  """1 − mean cosine similarity between joint representations (B, D)."""
  dot = jnp.sum(z_student * z_teacher, axis=-1)
  norms = jnp.linalg.norm(z_student, axis=-1) * jnp.linalg.norm(z_teacher, axis=-1)
  cos = dot / jnp.maximum(norms, eps)
  return jnp.sum((1.0 - cos) * valid), jnp.sum(valid)


def attention_kl_rows(q_t, k_t, q_s, k_s):
  """Per query row, KL(softmax(q_t·k_tᵀ) ‖ softmax(q_s·k_sᵀ)) over the keys.

  q_* (..., T, D) scaled queries, k_* (..., S, D) keys of the teacher (t) and student (s)
  → (..., T).
  """
  log_t = jax.nn.log_softmax(jnp.einsum('...qd,...kd->...qk', q_t, k_t), axis=-1)
  log_s = jax.nn.log_softmax(jnp.einsum('...qd,...kd->...qk', q_s, k_s), axis=-1)
  return jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)


def attention_kl(qk_teacher, qk_student, valid, rows_fn=attention_kl_rows):
  """KL(softmax(S_t) ‖ softmax(S_s)) over keys, summed, divided by B·heads, for the scores
  S = q·kᵀ of the last MCT layer given as their factors: qk_* = (scaled queries, keys), each
  (B, H, T, D). The teacher side is a constant (its gradient is stopped). rows_fn: the
  per-row KL (`attention_kl_rows` or a form with its signature, models/ops.py).
  """
  q_t, k_t = (jax.lax.stop_gradient(t) for t in qk_teacher)
  q_s, k_s = qk_student
  kl = jnp.sum(rows_fn(q_t, k_t, q_s, k_s), axis=(1, 2))
  return jnp.sum(kl * valid), jnp.sum(valid) * q_t.shape[1]


def smooth_l1(x):
  a = jnp.abs(x)
  return jnp.where(a < 1.0, 0.5 * x * x, a - 0.5)


def reconstruction(pred, target, dropped):
  """SmoothL1 (β = 1) summed over the features of dropped positions.

  pred, target (B, T, D); dropped (B, T) = (valid − keep) · valid_example. Denominator:
  number of dropped positions × D (+1e-6 is added by the caller after the global sum).
  """
  d = dropped[..., None]
  num = jnp.sum(smooth_l1(pred * d - target * d))
  return num, jnp.sum(dropped) * pred.shape[-1]
