"""Missing-modality keep masks (cider_jax/masks.py)."""
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cider_jax import masks


def prefix_mask(lengths, width):
  """(B, width) float mask with the first lengths[b] positions valid."""
  return (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def specials(text_mask):
  """(B, L) bool: [CLS] (0) and [SEP] (len-1) positions of valid texts."""
  lengths = text_mask.sum(1).astype(int)
  out = np.zeros(text_mask.shape, bool)
  rows = np.flatnonzero(lengths > 0)
  out[rows, 0] = True
  out[rows, lengths[rows] - 1] = True
  return out


# -------------------------------------------------------------------------- training

def test_train_keep_only_valid_specials_kept_and_rate_one_half():
  batch, lengths = 64, np.random.default_rng(0).integers(2, 50, 64)
  text_mask = prefix_mask(lengths, 50)
  audio_mask = prefix_mask(np.full(batch, 400), 500)
  vision_mask = prefix_mask(np.full(batch, 300), 300)
  keys = masks.example_keys(jax.random.key(0), 7, jnp.arange(batch))
  t, a, v = jax.jit(masks.train_keep)(keys, text_mask, audio_mask, vision_mask)
  t, a, v = map(np.asarray, (t, a, v))
  assert t.dtype == np.float32 and a.shape == (batch, 500) and v.shape == (batch, 300)
  for keep, valid in ((t, text_mask), (a, audio_mask), (v, vision_mask)):
    assert set(np.unique(keep)) <= {0.0, 1.0}
    assert np.all(keep <= valid)
  assert np.all(t[specials(text_mask)] == 1)
  # P(u > r) = 1/2 for independent u, r ~ U(0,1). 25,600 audio + 19,200 vision positions:
  # the std of the kept fraction is about 0.003; 0.02 is more than 6 std.
  frac = (a.sum() + v.sum()) / (audio_mask.sum() + vision_mask.sum())
  assert abs(frac - 0.5) < 0.02
  # text without its forced [CLS]/[SEP]
  inner = (text_mask > 0) & ~specials(text_mask)
  assert abs(t[inner].mean() - 0.5) < 0.03  # ~1,500 positions, std ~0.013


def test_train_keep_independent_of_batch_composition_and_devices():
  base, step = jax.random.key(3), 11
  index = np.array([4, 9, 2, 7])
  mask = prefix_mask([30, 30, 30, 30], 30)
  whole = np.asarray(masks.rmfm_train_keep(masks.example_keys(base, step, index), mask))
  # the same examples split over two "devices", in another order
  parts = [masks.rmfm_train_keep(masks.example_keys(base, step, index[[2, 0]]), mask[:2]),
           masks.rmfm_train_keep(masks.example_keys(base, step, index[[3, 1]]), mask[2:])]
  parts = np.concatenate([np.asarray(p) for p in parts])
  np.testing.assert_array_equal(parts, whole[[2, 0, 3, 1]])
  other_step = masks.rmfm_train_keep(masks.example_keys(base, step + 1, index), mask)
  assert not np.array_equal(np.asarray(other_step), whole)


def test_train_keep_accepts_raw_keys_and_a_single_key():
  mask = prefix_mask([5, 8], 8)
  raw = masks.example_keys(jax.random.PRNGKey(0), 0, jnp.arange(2))
  assert raw.shape == (2, 2)
  t = masks.text_train_keep(masks.modality_keys(raw)[0], mask)
  assert t.shape == (2, 8) and np.all(np.asarray(t) <= mask)
  single = masks.rmfm_train_keep(jax.random.key(1), mask)
  assert single.shape == (2, 8)
  with pytest.raises(ValueError, match='per-example keys'):
    masks.rmfm_train_keep(jax.random.split(jax.random.key(0), 3), mask)


def test_modality_keys_differ():
  keys = masks.example_keys(jax.random.key(0), 0, jnp.arange(2))
  mask = prefix_mask([40, 40], 40)
  kt, ka, kv = masks.modality_keys(keys)
  draws = [np.asarray(masks.rmfm_train_keep(k, mask)) for k in (kt, ka, kv)]
  assert not np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[1], draws[2])


# ------------------------------------------------------------------------ apply_keep

def test_apply_keep_by_hand():
  ids = np.array([[101, 7, 8, 102, 0]], np.float32)
  att = np.array([[1, 1, 1, 1, 0]], np.float32)
  text = np.stack([ids, att, np.zeros_like(ids)], 1)  # (1, 3, 5)
  audio = np.arange(1, 9, dtype=np.float32).reshape(1, 4, 2)
  vision = np.ones((1, 3, 2), np.float32)
  batch = {'text': text, 'audio': audio, 'vision': vision, 'labels': np.array([2])}
  out = jax.jit(masks.apply_keep)(batch, np.array([[1, 0, 1, 1, 0]], np.float32),
                                  np.array([[1, 0, 0, 1]], np.float32),
                                  np.array([[0, 1, 0]], np.float32))
  np.testing.assert_array_equal(out['text'][0, 0], [101, 100, 8, 102, 0])  # padding stays 0
  np.testing.assert_array_equal(out['text'][0, 1:], text[0, 1:])  # attention mask unchanged
  np.testing.assert_array_equal(out['audio'][0], [[1, 2], [0, 0], [0, 0], [7, 8]])
  np.testing.assert_array_equal(out['vision'][0], [[0, 0], [1, 1], [0, 0]])
  np.testing.assert_array_equal(out['labels'], [2])
  np.testing.assert_array_equal(batch['text'], text)  # input untouched


def test_apply_keep_with_2d_ids_and_errors():
  batch = {'text': np.array([[101, 5, 102]]), 'text_mask': np.ones((1, 3)),
           'audio': np.ones((1, 2, 1)), 'vision': np.ones((1, 2, 1))}
  out = masks.apply_keep(batch, np.array([[1, 0, 1]]), np.ones((1, 2)), np.ones((1, 2)))
  np.testing.assert_array_equal(out['text'], [[101, 100, 102]])
  with pytest.raises(ValueError, match='audio_keep'):
    masks.apply_keep(batch, np.ones((1, 3)), np.ones((1, 3)), np.ones((1, 2)))
  with pytest.raises(ValueError, match="'vision'"):
    masks.apply_keep({'text': batch['text'], 'audio': batch['audio']}, None, None, None)


# ------------------------------------------------------------------------ test modes

def _masks(lengths, a_lengths=None, v_lengths=None, width=20, a_width=30, v_width=25,
           aligned=False):
  t = prefix_mask(lengths, width)
  if aligned:
    return t, t.copy(), t.copy()
  return t, prefix_mask(a_lengths, a_width), prefix_mask(v_lengths, v_width)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), mode=st.sampled_from(masks.TEST_MODES),
       rate=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.9, 1.0]), seed=st.integers(0, 2**31))
def test_test_keep_properties(data, mode, rate, seed):
  batch = data.draw(st.integers(1, 6))
  lengths = data.draw(hnp.arrays(np.int64, (batch,), elements=st.integers(2, 20)))
  aligned = mode in masks.ALIGNED_ONLY_MODES or data.draw(st.booleans())
  if aligned:
    t_mask, a_mask, v_mask = _masks(lengths, aligned=True)
  else:
    a_len = data.draw(hnp.arrays(np.int64, (batch,), elements=st.integers(0, 30)))
    v_len = data.draw(hnp.arrays(np.int64, (batch,), elements=st.integers(0, 25)))
    t_mask, a_mask, v_mask = _masks(lengths, a_len, v_len)
  t, a, v = masks.test_keep(mode, rate, t_mask, a_mask, v_mask, seed, aligned)
  for keep, valid in ((t, t_mask), (a, a_mask), (v, v_mask)):
    assert keep.dtype == np.float32 and keep.shape == valid.shape
    assert np.all(keep <= valid)  # only valid positions are kept
  sp = specials(t_mask)
  assert np.all(t[sp] == 1)  # [CLS]/[SEP] always kept
  if rate == 0.0:
    for keep, valid in ((t, t_mask), (a, a_mask), (v, v_mask)):
      np.testing.assert_array_equal(keep, valid)
  if rate == 1.0:
    np.testing.assert_array_equal(t > 0, sp)  # only [CLS]/[SEP] of the text
    if mode in ('RMFM', 'RMFM_same', 'RMM'):
      assert a.sum() == 0 and v.sum() == 0
  if mode in masks.ALIGNED_ONLY_MODES:  # one mask shared by the three modalities
    np.testing.assert_array_equal(a, t)
    np.testing.assert_array_equal(v, t)
  if mode == 'RMM':  # whole modalities: all valid positions or none (text: or only specials)
    for keep, valid in ((a, a_mask), (v, v_mask)):
      assert np.all((keep == valid).all(1) | (keep == 0).all(1))
    assert np.all((t == t_mask).all(1) | ((t > 0) == sp).all(1))
  if mode == 'STMFM':  # one contiguous block of round((len-2)·p) positions, start >= 1
    for b in range(batch):
      dropped = np.flatnonzero((t_mask[b] > 0) & (t[b] == 0))
      assert dropped.size == int(np.around((lengths[b] - 2) * rate))
      if dropped.size:
        assert dropped[0] >= 1 and dropped[-1] <= lengths[b] - 2
        np.testing.assert_array_equal(dropped, np.arange(dropped[0], dropped[-1] + 1))
  again = masks.test_keep(mode, rate, t_mask, a_mask, v_mask, seed, aligned)
  for x, y in zip((t, a, v), again):
    np.testing.assert_array_equal(x, y)  # deterministic


@pytest.mark.parametrize('mode', masks.TEST_MODES)
def test_test_keep_independent_of_batch_composition(mode):
  rng = np.random.default_rng(1)
  n = 12
  t_mask, a_mask, v_mask = _masks(rng.integers(2, 21, n), aligned=True)
  whole = masks.test_keep(mode, 0.4, t_mask, a_mask, v_mask, 1111, True)
  # batches of 5 in another order, the last one padded with an all-invalid row
  order = rng.permutation(n)
  for start in range(0, n, 5):
    idx = order[start:start + 5]
    pad = 5 - len(idx)
    sel = lambda m: np.concatenate([m[idx], np.zeros((pad, m.shape[1]), m.dtype)])
    got = masks.test_keep(mode, 0.4, sel(t_mask), sel(a_mask), sel(v_mask), 1111, True,
                          index=np.concatenate([idx, np.zeros(pad, int)]))
    for g, w in zip(got, whole):
      np.testing.assert_array_equal(g[:len(idx)], w[idx])
      assert np.all(g[len(idx):] == 0)


def test_test_keep_seed_and_mode_change_masks_and_rates_are_nested():
  t_mask, a_mask, v_mask = _masks(np.full(50, 20), np.full(50, 30), np.full(50, 25))
  base = masks.test_keep('RMFM', 0.5, t_mask, a_mask, v_mask, 1111, False)
  other = masks.test_keep('RMFM', 0.5, t_mask, a_mask, v_mask, 1112, False)
  assert not np.array_equal(base[1], other[1])
  prev = None
  for rate in np.linspace(0, 1, 11):
    cur = masks.test_keep('RMFM', rate, t_mask, a_mask, v_mask, 1111, False)
    if prev is not None:  # a position dropped at a lower rate stays dropped
      assert all(np.all(c <= p) for c, p in zip(cur, prev))
    prev = cur
  # kept fraction at p = 0.3: 1,500 audio + 1,250 vision positions, std ~0.009
  keep = masks.test_keep('RMFM', 0.3, t_mask, a_mask, v_mask, 1111, False)
  assert abs((keep[1].sum() + keep[2].sum()) / 2750 - 0.7) < 0.04


def test_rmfm_same_per_modality_rates():
  t_mask, a_mask, v_mask = _masks([6, 9], [30, 12], [3, 25])
  for name, rates in masks.SPECIFIC_MODALITY_RATES.items():
    t, a, v = masks.test_keep('RMFM_same', rates, t_mask, a_mask, v_mask, 0, False)
    np.testing.assert_array_equal(t, t_mask if 'L' in name else specials(t_mask))
    np.testing.assert_array_equal(a, a_mask if 'A' in name else 0 * a_mask)
    np.testing.assert_array_equal(v, v_mask if 'V' in name else 0 * v_mask)
  # a scalar p means (p, p, p)
  for x, y in zip(masks.test_keep('RMFM_same', 0.4, t_mask, a_mask, v_mask, 5, False),
                  masks.test_keep('RMFM_same', (0.4, 0.4, 0.4), t_mask, a_mask, v_mask, 5,
                                  False)):
    np.testing.assert_array_equal(x, y)


def test_test_keep_errors():
  t_mask, a_mask, v_mask = _masks([5], [5], [5])
  with pytest.raises(ValueError, match='RMFM, RMFM_same, RMM, TMFM, STMFM'):
    masks.test_keep('RANDOM', 0.1, t_mask, a_mask, v_mask, 0, False)
  for mode in ('TMFM', 'STMFM'):
    with pytest.raises(ValueError, match='aligned'):
      masks.test_keep(mode, 0.1, t_mask, a_mask, v_mask, 0, False)
  with pytest.raises(ValueError, match='equal length'):
    masks.test_keep('TMFM', 0.1, t_mask, a_mask, v_mask, 0, True)
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    masks.test_keep('RMFM', 1.5, t_mask, a_mask, v_mask, 0, False)
  with pytest.raises(ValueError, match='triple'):
    masks.test_keep('RMFM', (0.1, 0.2, 0.3), t_mask, a_mask, v_mask, 0, False)
  with pytest.raises(ValueError, match='batch size'):
    masks.test_keep('RMFM', 0.1, t_mask, np.ones((2, 5)), v_mask, 0, False)
  with pytest.raises(ValueError, match='index'):
    masks.test_keep('RMFM', 0.1, t_mask, a_mask, v_mask, 0, False, index=np.array([-1]))
