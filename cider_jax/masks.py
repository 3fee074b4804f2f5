"""Missing-modality keep masks (docs/model.md §3). A keep mask is 1 where a position is kept.

Keep masks are only ever 1 on valid positions, and the text's [CLS] (position 0) and [SEP]
(position len-1, len = sum of the attention mask) are always kept.

Training (RMFM, inside jit): every position draws a rate r ~ U(0,1) and u ~ U(0,1) and is kept
iff u > r, i.e. with probability 1/2. Randomness comes from per-example keys,

    keys = example_keys(base_key, step, global_index)   # fold_in(fold_in(base, step), index)
    text_keep, audio_keep, vision_keep = train_keep(keys, text_mask, audio_mask, vision_mask)

so a mask depends only on (base_key, step, global example index): not on the number of
devices nor on how the batch is split among them.

Test modes (numpy, seeded: `test_keep`), p the missing rate; a position is kept iff its
uniform u > p:
  RMFM       one rate for every position of every modality.
  RMFM_same  one rate per modality: `rate` is (p_t, p_a, p_v), or a scalar p meaning
             (p, p, p) as the original's evaluation script does (`[mr, mr, mr]`). With a
             rate of 1 on some modalities this is specific-modality missing
             (SPECIFIC_MODALITY_RATES). At equal rates it has the same distribution as
             RMFM (both draw every position independently); the draws differ.
  RMM        each modality of an example dropped whole with probability p (a triple
             (p_t, p_a, p_v) is accepted too); dropped text keeps only [CLS]/[SEP].
  TMFM       (aligned only) one time mask, drawn on the text positions, shared by all three.
  STMFM      (aligned only) one contiguous block of round((len-2)·p) positions (numpy's
             round-half-to-even, as the original) starting at a uniformly drawn position in
             [1, len-1-block], shared by all three modalities.
[CLS]/[SEP] are always kept (for TMFM/STMFM the shared mask, so audio/vision keep those time
steps too, as in the original); keep masks are 0 on invalid positions. Rate 0 keeps every
valid position.

Determinism: every test mask of an example is a pure function of (seed, mode, index[b],
modality, position) and the rate, so it does not depend on batch size, batch composition or
padding, and is the same for every model. The random numbers do not depend on the rate, so
masks are nested across rates (a position dropped at p is dropped at every p' > p; STMFM
excepted), like the original, which reseeds with the same seed for every rate.
"""
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from cider_jax import tokens

TEST_MODES = ('RMFM', 'RMFM_same', 'RMM', 'TMFM', 'STMFM')
ALIGNED_ONLY_MODES = ('TMFM', 'STMFM')  # one time mask shared by the three modalities

# Specific-modality missing: `RMFM_same` rates (p_t, p_a, p_v) that keep only the named
# modalities (L text, A audio, V vision), as in the original's evaluation script.
SPECIFIC_MODALITY_RATES = {
    'L': (0.0, 1.0, 1.0), 'A': (1.0, 0.0, 1.0), 'V': (1.0, 1.0, 0.0),
    'LA': (0.0, 0.0, 1.0), 'LV': (0.0, 1.0, 0.0), 'AV': (1.0, 0.0, 0.0),
    'LAV': (0.0, 0.0, 0.0),
}


# ------------------------------------------------------------------------------ training

def example_keys(base_key, step, global_index) -> jax.Array:
  """Per-example keys fold_in(fold_in(base_key, step), global_index[b]).

  Args:
    base_key: one PRNG key (typed or raw uint32).
    step: scalar int, the training step (may be traced).
    global_index: (B,) int, index of each example in the global batch order (e.g. its
      position in the epoch's permutation, or its dataset index): anything that does not
      depend on the device layout.

  Returns:
    (B,) keys (raw keys: (B, 2) uint32).
  """
  step_key = jax.random.fold_in(base_key, step)
  return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.asarray(global_index))


def _key_batch_shape(keys):
  if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
    return keys.shape
  return keys.shape[:-1]  # raw uint32 keys carry their key data on the last axis


def _per_example_keys(keys, batch_size):
  """(B,) keys from per-example keys (returned as is) or from one key (split into B)."""
  shape = _key_batch_shape(keys)
  if shape == ():
    return jax.random.split(keys, batch_size)
  if shape != (batch_size,):
    raise ValueError(f'keys: expected one key or {batch_size} per-example keys, got key batch '
                     f'shape {shape}')
  return keys


def modality_keys(keys) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Split (B,) per-example keys into (text_keys, audio_keys, vision_keys), each (B,)."""
  split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
  return split[:, 0], split[:, 1], split[:, 2]


def rmfm_train_keep(keys, valid_mask) -> jax.Array:
  """Training RMFM keep mask: each valid position kept iff u > r, u, r ~ U(0, 1).

  Args:
    keys: (B,) per-example keys (recommended, see the module docstring), or one key, which is
      split into B keys (then the mask depends on the batch layout).
    valid_mask: (B, T) 1 on valid positions.

  Returns:
    (B, T) float32 keep mask, 0 on invalid positions.
  """
  valid_mask = jnp.asarray(valid_mask)
  if valid_mask.ndim != 2:
    raise ValueError(f'valid_mask: expected shape (B, T), got {valid_mask.shape}')
  keys = _per_example_keys(keys, valid_mask.shape[0])

  def one(key, valid):
    key_rate, key_draw = jax.random.split(key)
    rate = jax.random.uniform(key_rate, valid.shape)
    draw = jax.random.uniform(key_draw, valid.shape)
    return ((draw > rate) & (valid > 0)).astype(jnp.float32)

  return jax.vmap(one)(keys, valid_mask)


def _force_cls_sep(keep, text_mask, xp):
  """keep with positions 0 and len-1 set to 1 (len = sum of text_mask), valid positions only.

  keep, text_mask: (B, L); xp: numpy or jax.numpy.
  """
  valid = text_mask > 0
  lengths = valid.sum(axis=1, keepdims=True)
  pos = xp.arange(keep.shape[1])[None, :]
  special = ((pos == 0) | (pos == lengths - 1)) & valid
  return xp.where(special, xp.ones_like(keep), keep) * valid.astype(keep.dtype)


def text_train_keep(keys, text_mask) -> jax.Array:
  """`rmfm_train_keep` for text, with [CLS] and [SEP] always kept. (B,) keys, (B, L) mask."""
  keep = rmfm_train_keep(keys, text_mask)
  return _force_cls_sep(keep, jnp.asarray(text_mask), jnp)


def train_keep(keys, text_mask, audio_mask, vision_mask):
  """Training RMFM keep masks of all three modalities from (B,) per-example keys.

  Args:
    keys: (B,) per-example keys from `example_keys` (split here per modality).
    text_mask: (B, L), audio_mask: (B, La), vision_mask: (B, Lv) validity masks.

  Returns:
    (text_keep (B, L), audio_keep (B, La), vision_keep (B, Lv)), float32.
  """
  keys = _per_example_keys(keys, jnp.shape(text_mask)[0])
  k_text, k_audio, k_vision = modality_keys(keys)
  return (text_train_keep(k_text, text_mask), rmfm_train_keep(k_audio, audio_mask),
          rmfm_train_keep(k_vision, vision_mask))


def apply_keep(batch, text_keep, audio_keep, vision_keep, unk_id: int = tokens.BERT.unk):
  """Masked copy of a batch: dropped tokens -> [UNK] (`unk_id`), dropped frames -> 0.

  Pure jnp, works inside jit. The attention mask is unchanged; padding stays as it is.

  Args:
    batch: dict with 'text' (B, 3, L) (ids, attention mask, segment ids; MMSA layout; or
      (B, L) ids together with 'text_mask' (B, L)), 'audio' (B, La, Da), 'vision'
      (B, Lv, Dv). Other entries are passed through.
    text_keep (B, L), audio_keep (B, La), vision_keep (B, Lv): keep masks (1 = kept).
    unk_id: the [UNK] id of the text's vocabulary (bert-base-uncased's by default).

  Returns:
    A new dict with 'text', 'audio' and 'vision' replaced by their masked versions.
  """
  for name in ('text', 'audio', 'vision'):
    if name not in batch:
      raise ValueError(f"apply_keep: batch has no '{name}' entry (keys: {sorted(batch)})")
  text = jnp.asarray(batch['text'])
  if text.ndim == 3:
    ids, valid = text[:, 0], text[:, 1] > 0
  elif text.ndim == 2:
    if 'text_mask' not in batch:
      raise ValueError("apply_keep: 'text' given as (B, L) ids needs a 'text_mask' (B, L) entry")
    ids, valid = text, jnp.asarray(batch['text_mask']) > 0
  else:
    raise ValueError(f"apply_keep: 'text' must be (B, 3, L) or (B, L), got {text.shape}")
  _check_shape('text_keep', text_keep, ids.shape)
  audio, vision = jnp.asarray(batch['audio']), jnp.asarray(batch['vision'])
  _check_shape('audio_keep', audio_keep, audio.shape[:2])
  _check_shape('vision_keep', vision_keep, vision.shape[:2])

  dropped = valid & ~(jnp.asarray(text_keep) > 0)
  ids_m = jnp.where(dropped, jnp.asarray(unk_id, ids.dtype), ids)
  text_m = text.at[:, 0].set(ids_m) if text.ndim == 3 else ids_m
  out = dict(batch)
  out['text'] = text_m
  out['audio'] = jnp.where(jnp.asarray(audio_keep)[..., None] > 0, audio, 0).astype(audio.dtype)
  out['vision'] = jnp.where(jnp.asarray(vision_keep)[..., None] > 0, vision,
                            0).astype(vision.dtype)
  return out


def _check_shape(name, x, shape):
  if tuple(np.shape(x)) != tuple(shape):
    raise ValueError(f'{name}: expected shape {tuple(shape)}, got {tuple(np.shape(x))}')


# ---------------------------------------------------------------------------- test modes

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MODE_CODES = {mode: i + 1 for i, mode in enumerate(TEST_MODES)}
# Streams of uniforms per example: one per position of each of these.
_TEXT, _AUDIO, _VISION, _SHARED, _MODALITY, _BLOCK = range(6)


def _mix64(z):
  """SplitMix64 output function on uint64 arrays."""
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def _uniforms(seed, mode, index, stream, length):
  """(B, length) float64 uniforms in (0, 1), a pure function of (seed, mode, index[b],
  stream, position): the SplitMix64 sequence of a key derived from (seed, mode), read at a
  counter built from (index, stream, position)."""
  with np.errstate(over='ignore'):
    key = _mix64(np.asarray([int(seed) & (2**64 - 1)], np.uint64)) ^ np.uint64(_MODE_CODES[mode])
    key = _mix64(key * _GAMMA)
    counter = ((index.astype(np.uint64)[:, None] << np.uint64(20))
               | (np.uint64(stream) << np.uint64(16))
               | np.arange(length, dtype=np.uint64)[None, :])
    bits = _mix64(key + (counter + np.uint64(1)) * _GAMMA)
  return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _check_rate(rate, name='rate'):
  rate = float(rate)
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f'{name} must lie in [0, 1], got {rate}')
  return rate


def _mode_rates(mode, rate):
  """(p_t, p_a, p_v) from a scalar rate, or from a 3-sequence for RMFM_same / RMM."""
  if np.ndim(rate) == 0:
    p = _check_rate(rate)
    return p, p, p
  if mode not in ('RMFM_same', 'RMM') or len(rate) != 3:
    raise ValueError(f'mode {mode!r} takes one rate in [0, 1]; a (p_text, p_audio, p_vision) '
                     f'triple only for RMFM_same or RMM; got {rate!r}')
  return tuple(_check_rate(p, f'rate[{i}]') for i, p in enumerate(rate))


def check_mode(mode: str, aligned: bool) -> None:
  """ValueError unless `mode` is a test mode usable on aligned / unaligned data."""
  if mode not in TEST_MODES:
    raise ValueError(f'unknown missing mode {mode!r}; valid modes: {", ".join(TEST_MODES)}')
  if mode in ALIGNED_ONLY_MODES and not aligned:
    unaligned = ', '.join(m for m in TEST_MODES if m not in ALIGNED_ONLY_MODES)
    raise ValueError(f'missing mode {mode!r} needs word-aligned data (data.aligned=True): it '
                     f'shares one time mask across text, audio and vision; modes for unaligned '
                     f'data: {unaligned}')


def test_keep(mode: str, rate: Union[float, Sequence[float]], text_mask, audio_mask, vision_mask,
              seed: int, aligned: bool, index: Optional[np.ndarray] = None):
  """Seeded keep masks of a test missing mode (see the module docstring), numpy.

  Args:
    mode: one of TEST_MODES.
    rate: missing rate in [0, 1], or a triple (p_text, p_audio, p_vision) for RMFM_same / RMM.
    text_mask (B, L), audio_mask (B, La), vision_mask (B, Lv): validity masks (1 = valid);
      text length = sum of text_mask, [SEP] at len-1.
    seed: int mask seed (eval.seed).
    aligned: whether the data are word-aligned (required by TMFM/STMFM, which also need
      La == Lv == L).
    index: (B,) int >= 0, the examples' indices in their split; default arange(B), i.e. the
      arrays hold a whole split. Padded rows may carry any index (their masks are 0).

  Returns:
    (text_keep (B, L), audio_keep (B, La), vision_keep (B, Lv)), float32.
  """
  check_mode(mode, aligned)
  valid = tuple(_valid_mask(name, m) for name, m in
                (('text_mask', text_mask), ('audio_mask', audio_mask),
                 ('vision_mask', vision_mask)))
  index = _example_index(index, valid)
  rates = _mode_rates(mode, rate)
  text, audio, vision = _mode_draws(mode, rates, valid,
                                    lambda stream, n: _uniforms(seed, mode, index, stream, n))
  text_valid, audio_valid, vision_valid = valid
  text_keep = _force_cls_sep((text & text_valid).astype(np.float32), text_valid, np)
  return (text_keep, (audio & audio_valid).astype(np.float32),
          (vision & vision_valid).astype(np.float32))


test_keep.__test__ = False  # not a pytest test, whatever module imports it


def _stmfm_keep(u, text_valid, rate):
  """(B, L) bool: valid positions outside one block per example. u: (B,) uniforms."""
  lengths = text_valid.sum(axis=1)
  block = np.maximum(np.around((lengths - 2) * rate).astype(np.int64), 0)
  span = lengths - block - 1  # number of admissible starts: 1 .. len-1-block
  start = 1 + np.floor(u * np.maximum(span, 1)).astype(np.int64)
  block = np.where(span >= 1, block, 0)
  pos = np.arange(text_valid.shape[1])[None, :]
  in_block = (pos >= start[:, None]) & (pos < (start + block)[:, None])
  return text_valid & ~in_block


def _valid_mask(name, mask):
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f'{name}: expected shape (B, T), got {mask.shape}')
  if mask.shape[1] >= 2**16:
    raise ValueError(f'{name}: sequences longer than 65535 positions are not supported')
  return mask > 0


def _example_index(index, valid):
  """(B,) example indices (default arange(B)) after checking the masks agree on B."""
  text_valid, audio_valid, vision_valid = valid
  batch = text_valid.shape[0]
  if audio_valid.shape[0] != batch or vision_valid.shape[0] != batch:
    raise ValueError(f'masks disagree on the batch size: text {text_valid.shape}, audio '
                     f'{audio_valid.shape}, vision {vision_valid.shape}')
  index = np.arange(batch) if index is None else np.asarray(index)
  if index.shape != (batch,) or not np.issubdtype(index.dtype, np.integer) or (
      batch and index.min() < 0) or (batch and index.max() >= 2**40):
    raise ValueError(f'index: expected ({batch},) integers in [0, 2**40), got shape '
                     f'{index.shape}, dtype {index.dtype}')
  return index


def _mode_draws(mode, rates, valid, draw):
  """(text, audio, vision) bool keeps of a mode before the validity masks and [CLS]/[SEP].

  rates: (p_t, p_a, p_v); valid: the three (B, T) bool validity masks; draw(stream, length):
  (B, length) uniforms of a stream.
  """
  p_t, p_a, p_v = rates
  text_valid, audio_valid, vision_valid = valid
  num_text = text_valid.shape[1]
  if mode in ('RMFM', 'RMFM_same'):
    return (draw(_TEXT, num_text) > p_t, draw(_AUDIO, audio_valid.shape[1]) > p_a,
            draw(_VISION, vision_valid.shape[1]) > p_v)
  if mode == 'RMM':
    kept = draw(_MODALITY, 3) > np.asarray([p_t, p_a, p_v])
    return (np.broadcast_to(kept[:, :1], text_valid.shape),
            np.broadcast_to(kept[:, 1:2], audio_valid.shape),
            np.broadcast_to(kept[:, 2:], vision_valid.shape))
  if audio_valid.shape[1] != num_text or vision_valid.shape[1] != num_text:
    raise ValueError(f'mode {mode!r} needs aligned sequences of equal length, got text '
                     f'{num_text}, audio {audio_valid.shape[1]}, vision {vision_valid.shape[1]}')
  if mode == 'TMFM':
    shared = draw(_SHARED, num_text) > p_t
  else:
    shared = _stmfm_keep(draw(_BLOCK, 1)[:, 0], text_valid, p_t)
  shared = _force_cls_sep(shared.astype(np.float32), text_valid, np) > 0
  return shared, shared, shared
