"""Text checks of `check_split`: every attended text is [CLS] ... [SEP]."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cider_jax.data.validate import DataError, check_split
from cider_jax.tokens import BERT
from tests.conftest import make_mmsa_split

SMALL = dict(text_len=10, audio_len=6, vision_len=7, audio_dim=2, vision_dim=3)


def _split(rows, text_len):
  """A split dict with the given token rows ([CLS] ... [SEP], unpadded) and small features."""
  n = len(rows)
  ids = np.zeros((n, text_len))
  mask = np.zeros((n, text_len))
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
    mask[i, :len(row)] = 1
  return {
      'text_bert': np.stack([ids, mask, np.zeros_like(ids)], axis=1),
      'audio': np.zeros((n, 3, 2)), 'vision': np.zeros((n, 4, 3)),
      'audio_lengths': np.full(n, 3), 'vision_lengths': np.full(n, 4),
      'regression_labels': np.zeros(n),
  }


def _lengths(raw):
  return raw['text_bert'][:, 1].sum(1).astype(int)


def test_text_without_sep_is_refused():
  raw = make_mmsa_split(5, **SMALL)
  i = 3
  raw['text_bert'][i, 0, _lengths(raw)[i] - 1] = 2003
  with pytest.raises(DataError) as info:
    check_split(raw, 'valid')
  e = info.value
  assert (e.split, e.field, e.index) == ('valid', 'text_bert', i)
  assert str(e).startswith("split 'valid', field 'text_bert', example 3: last attended token")
  assert 'not [SEP] (id 102)' in str(e)


def test_sep_after_the_attention_mask_is_refused():
  raw = make_mmsa_split(4, **SMALL)
  i, length = 1, _lengths(raw)[1]
  raw['text_bert'][i, 1, length - 1] = 0  # mask one short: [SEP] is no longer attended
  with pytest.raises(DataError, match=f'example 1: last attended token \\(position '
                     f'{length - 2}, text length {length - 1}\\)'):
    check_split(raw, 'train')


def test_text_without_cls_is_refused():
  raw = make_mmsa_split(4, **SMALL)
  raw['text_bert'][2, 0, 0] = 2003
  with pytest.raises(DataError) as info:
    check_split(raw, 'test')
  e = info.value
  assert (e.split, e.field, e.index) == ('test', 'text_bert', 2)
  assert 'first token is id 2003, not [CLS] (id 101)' in str(e)


def test_cls_alone_is_refused():
  raw = _split([[BERT.cls, 7, BERT.sep], [BERT.cls]], text_len=4)
  with pytest.raises(DataError, match="example 1: last attended token .* is id 101, not"):
    check_split(raw, 'train')


_rows = st.lists(st.lists(st.integers(103, 30521), min_size=0, max_size=10), min_size=1,
                 max_size=6).map(lambda rows: [[BERT.cls] + r + [BERT.sep] for r in rows])


@settings(max_examples=60, deadline=None)
@given(rows=_rows, pad=st.integers(0, 3))
def test_valid_texts_are_accepted(rows, pad):
  text_len = max(map(len, rows)) + pad
  out = check_split(_split(rows, text_len), 'train')
  np.testing.assert_array_equal(out['text_mask'].sum(1), [len(r) for r in rows])


@settings(max_examples=60, deadline=None)
@given(rows=_rows, pad=st.integers(0, 3), data=st.data())
def test_a_corrupted_sep_is_refused_naming_the_example(rows, pad, data):
  i = data.draw(st.integers(0, len(rows) - 1))
  rows[i][-1] = data.draw(st.integers(0, 30521).filter(lambda t: t != BERT.sep))
  with pytest.raises(DataError) as info:
    check_split(_split(rows, max(map(len, rows)) + pad), 'valid')
  e = info.value
  assert (e.split, e.field, e.index) == ('valid', 'text_bert', i)
  assert f"split 'valid', field 'text_bert', example {i}: last attended token" in str(e)
