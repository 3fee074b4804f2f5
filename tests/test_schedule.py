"""The learning-rate schedule (optim.lr_factor) and its factor in every form of the update.

The factor multiplies each group's learning rate at one step. Each form is checked against
optax run with the rates multiplied by hand (scale 1): the plain optax form, the in-place
kernel form (which folds the factor into the bias correction c1), and the row-wise word
table's updates (embedding_rows, both forms). Tolerance: the two sides differ by the rounding
of lr·s vs s·(lr·u) or of c1 / s, one float32 rounding of the update per step: |Δ| ≤ 1e-6 ·
the array's largest magnitude (a wrong factor, e.g. s² or none, moves them by > 1e-4 here).
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cider_jax import configuration, embedding_rows, optim
from cider_jax.kernels import adam as native_adam
from configs import default, quickstart

F = np.float32


def _cfg(scale=1.0, **extra):
  return ml_collections.ConfigDict(dict(bert_lr=5e-5 * scale, bert_weight_decay=1e-3,
                                        lr=1e-3 * scale, b1=0.9, b2=0.999, eps=1e-8, **extra))


def test_constant_schedule_is_one_at_every_step():
  factor = optim.lr_factor(_cfg(schedule='constant'), total_steps=10)
  assert [float(factor(jnp.int32(s))) for s in (0, 5, 9, 50)] == [1.0, 1.0, 1.0, 1.0]
  # a config without the field (older runs' saved configs) is constant too
  assert float(optim.lr_factor(_cfg(), 10)(jnp.int32(7))) == 1.0


def test_linear_tail_by_hand():
  """10 steps, decay from 0.4 of the run (step 4) to 0.1 at the last step (9): the factor
  falls by 0.9 / 5 = 0.18 a step after step 4, and stays at 0.1 past the end."""
  factor = optim.lr_factor(_cfg(schedule='linear_tail', decay_start=0.4, final_factor=0.1),
                           total_steps=10)
  got = [float(factor(jnp.int32(s))) for s in range(12)]
  want = [1, 1, 1, 1, 1, 0.82, 0.64, 0.46, 0.28, 0.1, 0.1, 0.1]
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_unknown_schedule_is_refused():
  with pytest.raises(ValueError, match='optim.schedule'):
    optim.lr_factor(_cfg(schedule='cosine'), 10)


@pytest.mark.parametrize('field,value', [('optim.schedule', 'cosine'),
                                         ('optim.final_factor', 0.0),
                                         ('optim.final_factor', 1.5),
                                         ('optim.decay_start', 1.0)])
def test_config_validation_names_the_bad_field(field, value):
  config = default.get_config()
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(configuration.ConfigError, match=field.replace('.', r'\.')):
    configuration.validate(config)


def test_shipped_defaults():
  """The paper setting keeps the original's constant rates; the quickstart decays them."""
  assert default.get_config().optim.schedule == 'constant'
  q = quickstart.get_config().optim
  assert (q.schedule, q.decay_start, q.final_factor) == ('linear_tail', 0.5, 0.1)


def _params(seed):
  rng = np.random.default_rng(seed)
  a = lambda *s: jnp.asarray(rng.normal(size=s).astype(F))
  return {'text_encoder': {'embeddings': {'word_embeddings': {'embedding': jnp.zeros((0, 8))},
                                          'LayerNorm': {'scale': a(8), 'bias': a(8)}},
                           'layer': {'kernel': a(8, 300), 'bias': a(300)}},
          'recon_text': {'kernel': a(8, 8)},
          'mct': {'kernel': a(70, 100), 'bias': a(100)}}


def _close(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    w = np.asarray(w)
    if np.issubdtype(w.dtype, np.integer):
      np.testing.assert_array_equal(g, w)
    else:
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-6 * float(np.max(np.abs(w), initial=0)))


@pytest.mark.parametrize('native', [False, True])
def test_scaled_update_equals_optax_at_scaled_rates(native):
  """Two iterations of the step's two updates at factor 0.3 equal optax with every rate × 0.3;
  and they differ from the unscaled update (so the comparison can fail)."""
  s = 0.3
  params = _params(0)
  tx, labels = optim.make_optimizer(_cfg(), params, aligned=False)
  tx_s, _ = optim.make_optimizer(_cfg(s), params, aligned=False)
  update = native_adam.apply_update if native else optim.apply_update

  def two(tx, cfg, scale, params, state, g1, g2, fn):
    p, st = fn(tx, labels, params, g1, state, cfg=cfg, skip=('student_only',), scale=scale)
    return fn(tx, labels, p, g2, st, cfg=cfg, scale=scale)

  got = (params, tx.init(params))
  want = (params, tx_s.init(params))
  plain = (params, tx.init(params))
  for it in range(2):
    g1, g2 = (jax.tree.map(lambda x: 0.1 * x, _params(10 * it + k)) for k in (1, 2))
    got = jax.jit(lambda p, st: two(tx, _cfg(), jnp.float32(s), p, st, g1, g2, update))(*got)
    want = jax.jit(lambda p, st: two(tx_s, _cfg(s), 1.0, p, st, g1, g2,
                                     optim.apply_update))(*want)
    plain = jax.jit(lambda p, st: two(tx, _cfg(), 1.0, p, st, g1, g2, update))(*plain)
  _close(got, want)
  k_got, k_plain = got[0]['mct']['kernel'], plain[0]['mct']['kernel']
  k0 = params['mct']['kernel']
  np.testing.assert_allclose(k_got - k0, s * (k_plain - k0), rtol=0, atol=1e-3 * 4e-3)
  assert float(jnp.abs(k_got - k_plain).max()) > 1e-4


@pytest.mark.parametrize('native', [False, True])
def test_word_table_zero_updates_take_the_factor(native):
  """The row-wise table's zero-gradient updates (two at once, as in a step) at factor 0.25
  equal the plain form at rates × 0.25, and the rows' own update too."""
  s = 0.25
  rng = np.random.default_rng(3)
  V, H = 50, 16
  table = jnp.asarray(rng.normal(size=(V, H)).astype(F))
  mu = jnp.asarray(0.1 * rng.normal(size=(V, H)).astype(F))
  nu = jnp.asarray(0.01 * rng.random(size=(V, H)).astype(F))
  ids = jnp.asarray([4, 0, 17, V], jnp.int32)
  count = jnp.int32(3)
  fn = native_adam.table_zero_updates if native else embedding_rows.table_zero_updates
  got = jax.jit(lambda *a: fn(*a, 2, cfg=_cfg(), group='bert_decay', scale=jnp.float32(s)))(
      table, mu, nu, ids, count)
  want = jax.jit(lambda *a: embedding_rows.table_zero_updates(
      *a, 2, cfg=_cfg(s), group='bert_decay'))(table, mu, nu, ids, count)
  _close(got, want)
  assert float(jnp.abs(got[0] - table).max()) > 1e-6
  g = jnp.asarray(rng.normal(size=(4, H)).astype(F))
  rows = embedding_rows.adam_step(_cfg(), table[:4], mu[:4], nu[:4], g, count, s)
  _close(rows, embedding_rows.adam_step(_cfg(s), table[:4], mu[:4], nu[:4], g, count))
