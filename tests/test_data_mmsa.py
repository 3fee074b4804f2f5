"""MMSA pickle reader: layout resolution, validation messages, -inf handling, CLI."""
import os
import pickle
import subprocess
import sys

import joblib
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from cider_jax.data import mmsa
from cider_jax.data.mmsa import DataError
from tests.conftest import make_mmsa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, data):
  with open(path, 'wb') as f:
    pickle.dump(data, f)
  return str(path)


def test_well_formed_mosi_pickle_is_accepted(tmp_path, mmsa_data):
  data = mmsa_data()
  splits = mmsa.load_mmsa(_write(tmp_path / 'unaligned_50.pkl', data))
  assert set(splits) == {'train', 'valid', 'test'}
  s = splits['train']
  assert len(s) == 12
  assert s.text_ids.shape == (12, 50) and s.text_ids.dtype == np.int32
  assert s.text_mask.dtype == np.float32 and s.text_segments.dtype == np.int32
  assert s.audio.shape == (12, 375, 5) and s.audio.dtype == np.float32
  assert s.vision.shape == (12, 500, 20) and s.vision_mask.shape == (12, 500)
  raw = data['train']
  np.testing.assert_array_equal(s.audio_mask.sum(1), raw['audio_lengths'])
  np.testing.assert_array_equal(s.vision_mask.sum(1), raw['vision_lengths'])
  np.testing.assert_array_equal(s.text_lengths, raw['text_bert'][:, 1].sum(1))
  np.testing.assert_array_equal(s.label3, raw['classification_labels'])
  np.testing.assert_array_equal(s.label7, np.round(np.clip(raw['regression_labels'], -3, 3)) + 3)
  assert s.label7[0] == 3 and s.label7[1] == 6 and s.label3[0] == 1
  np.testing.assert_array_equal(s.labels('binary'), s.label3)
  np.testing.assert_array_equal(s.labels('seven'), s.label7)
  assert s.ids[0] == 'video0$_$1' and s.raw_text[3] == 'sentence 3'
  with pytest.raises(ValueError, match='unknown task'):
    s.labels('five')


def test_aligned_file_uses_text_lengths(tmp_path, mmsa_data):
  data = mmsa_data(audio_len=50, vision_len=50, aligned=True)
  s = mmsa.load_mmsa(_write(tmp_path / 'aligned_50.pkl', data))['valid']
  np.testing.assert_array_equal(s.audio_mask, s.text_mask)
  np.testing.assert_array_equal(s.vision_mask, s.text_mask)


def test_minus_inf_becomes_zero_and_input_untouched(tmp_path, mmsa_data):
  data = mmsa_data()
  data['train']['audio'][2, 7, 1] = -np.inf
  data['test']['vision'][0, 0, 0] = -np.inf
  splits = mmsa.splits_from_dict(data)
  assert splits['train'].audio[2, 7, 1] == 0.0 and splits['test'].vision[0, 0, 0] == 0.0
  assert np.isneginf(data['train']['audio'][2, 7, 1])


def test_joblib_file_is_read(tmp_path, mmsa_data):
  data = mmsa_data()
  path = str(tmp_path / 'MOSI_unaligned_50.pkl')
  joblib.dump(data, path, compress=3)
  splits = mmsa.load_mmsa(path)
  np.testing.assert_allclose(splits['valid'].vision, data['valid']['vision'].astype(np.float32))


def _corrupt(data, split, field, fn):
  data[split][field] = fn(data[split][field])
  return data


def _set(index, value):
  def fn(a):
    a = np.array(a, copy=True)
    a[index] = value
    return a
  return fn


# (split, field, corruption, words the message must contain)
MALFORMED = {
    'nan_audio': ('train', 'audio', _set((4, 3, 2), np.nan), ["'audio'", 'example 4', 'NaN']),
    'posinf_vision': ('valid', 'vision', _set((1, 0, 0), np.inf), ["'vision'", 'example 1', '+inf']),
    'rank': ('test', 'audio', lambda a: a[:, :, 0], ["'audio'", 'rank 2']),
    'class_out_of_range': ('train', 'classification_labels', _set(5, 3.0),
                           ["'classification_labels'", 'example 5', '{0, 1, 2}']),
    'score_out_of_range': ('valid', 'regression_labels', _set(2, 3.5),
                           ["'regression_labels'", 'example 2', '[-3, 3]']),
    'length_beyond_array': ('train', 'audio_lengths', _set(6, 376),
                            ["'audio_lengths'", 'example 6', '376', '375']),
    'length_zero': ('test', 'vision_lengths', _set(0, 0), ["'vision_lengths'", 'example 0']),
    'n_mismatch': ('train', 'vision', lambda a: a[:-1], ["'vision'", '11 examples', '12']),
    'mask_not_prefix': ('train', 'text_bert', _set((3, 1, 1), 0.0),
                        ["'text_bert'", 'example 3', 'prefix']),
    'mask_not_binary': ('valid', 'text_bert', _set((0, 1, 0), 0.5), ["'text_bert'", '0/1']),
    'negative_token': ('test', 'text_bert', _set((2, 0, 1), -4.0),
                       ["'text_bert'", 'example 2', 'negative token id']),
    'fractional_token': ('test', 'text_bert', _set((1, 0, 1), 7.5),
                         ["'text_bert'", 'example 1', 'non-integer']),
    'text_rank': ('train', 'text_bert', lambda a: a[:, 0], ["'text_bert'", 'rank 2']),
    'lengths_count': ('valid', 'audio_lengths', lambda a: a[:3], ["'audio_lengths'", '3 entries']),
}


@pytest.mark.parametrize('case', sorted(MALFORMED))
def test_malformed_field_is_rejected_naming_it(tmp_path, mmsa_data, case):
  split, field, fn, words = MALFORMED[case]
  path = _write(tmp_path / 'bad.pkl', _corrupt(mmsa_data(), split, field, fn))
  with pytest.raises(DataError) as err:
    mmsa.load_mmsa(path)
  msg = str(err.value)
  assert '\n' not in msg
  for word in [path, f"'{split}'"] + words:
    assert word in msg, (word, msg)
  assert err.value.split == split and err.value.field == field


def test_missing_key_is_rejected(mmsa_data):
  data = mmsa_data()
  del data['valid']['regression_labels']
  with pytest.raises(DataError, match=r"split 'valid', field 'regression_labels': missing"):
    mmsa.splits_from_dict(data)


def test_missing_lengths_for_unaligned_is_rejected(mmsa_data):
  data = mmsa_data()
  del data['test']['vision_lengths']
  with pytest.raises(DataError, match=r"'vision_lengths': missing"):
    mmsa.splits_from_dict(data)
  with pytest.raises(DataError, match=r"'vision_lengths': missing"):
    mmsa.splits_from_dict(data, aligned=False)


def test_missing_split_and_empty_split_are_rejected(mmsa_data):
  data = mmsa_data()
  del data['test']
  with pytest.raises(DataError, match=r"split 'test' missing"):
    mmsa.splits_from_dict(data)
  data = mmsa_data()
  data['valid'] = {k: v[:0] for k, v in data['valid'].items()}
  with pytest.raises(DataError, match=r"split 'valid'.*empty"):
    mmsa.splits_from_dict(data)


def test_not_a_pickle_and_missing_file(tmp_path):
  path = tmp_path / 'notes.pkl'
  path.write_text('this is not a pickle\n')
  with pytest.raises(DataError, match='not a readable pickle or joblib file'):
    mmsa.load_mmsa(str(path))
  with pytest.raises(DataError, match=r'not found: expected .*nothere\.pkl'):
    mmsa.load_mmsa(str(tmp_path / 'nothere.pkl'))
  with pytest.raises(DataError, match='expected a dict with keys'):
    mmsa.load_mmsa(_write(tmp_path / 'list.pkl', [1, 2, 3]))


def _data_cfg(**kw):
  cfg = ml_collections.ConfigDict(dict(dir='/root', file='', dataset='mosi', aligned=False,
                                       setting='iid'))
  cfg.update(kw)
  return cfg


def test_resolve_path_layouts():
  assert mmsa.resolve_path(_data_cfg()) == '/root/CMU-MOSI/Processed/unaligned_50.pkl'
  assert (mmsa.resolve_path(_data_cfg(dataset='mosei', aligned=True))
          == '/root/CMU-MOSEI/Processed/aligned_50.pkl')
  assert (mmsa.resolve_path(_data_cfg(setting='ood'), 'seven')
          == '/root/OOD_MOSI/seven/MOSI_unaligned_50.pkl')
  cross = mmsa.resolve_split_paths(_data_cfg(setting='cross_dataset', aligned=True))
  assert cross == {'train': '/root/MSA_cross_datasets/mosi.pkl',
                   'valid': '/root/MSA_cross_datasets/mosi.pkl',
                   'test': '/root/MSA_cross_datasets/mosei.pkl'}
  assert mmsa.resolve_path(_data_cfg(file='/x/y.pkl'), 'binary', 'test') == '/x/y.pkl'
  with pytest.raises(DataError, match='data.dir is empty'):
    mmsa.resolve_path(_data_cfg(dir=''))
  with pytest.raises(DataError, match='aligned=True'):
    mmsa.resolve_path(_data_cfg(setting='cross_dataset'))


def test_config_load_missing_file_says_where(tmp_path):
  cfg = ml_collections.ConfigDict({'data': _data_cfg(dir=str(tmp_path)), 'task': 'binary'})
  with pytest.raises(DataError) as err:
    mmsa.load_mmsa(cfg)
  msg = str(err.value)
  assert 'mosi unaligned (iid)' in msg
  assert os.path.join(str(tmp_path), 'CMU-MOSI', 'Processed', 'unaligned_50.pkl') in msg


def test_cross_dataset_labels_from_score(tmp_path, mmsa_data):
  root = tmp_path / 'MSA_cross_datasets'
  root.mkdir()
  mosi = mmsa_data(sizes=(6, 4, 3), audio_len=50, vision_len=50, aligned=True)
  mosei = mmsa_data(sizes=(5, 5, 9), seed=10, audio_len=50, vision_len=50, aligned=True)
  for d in (mosi, mosei):
    for s in d.values():
      s['classification_labels'] = s['classification_labels'] * 0 + 7  # unused, even invalid
  _write(root / 'mosi.pkl', mosi)
  _write(root / 'mosei.pkl', mosei)
  cfg = ml_collections.ConfigDict({
      'data': _data_cfg(dir=str(tmp_path), setting='cross_dataset', aligned=True),
      'task': 'binary'})
  splits = mmsa.load_mmsa(cfg)
  assert [len(splits[k]) for k in ('train', 'valid', 'test')] == [6, 4, 9]
  np.testing.assert_array_equal(splits['test'].label3,
                                mmsa.label3_from_score(mosei['test']['regression_labels']))
  assert splits['train'].label3[0] == 1  # score exactly 0 -> neutral


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'cider_jax.data.mmsa', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=60)


def test_cli_summary_and_single_line_errors(tmp_path, mmsa_data):
  good = _write(tmp_path / 'good.pkl', mmsa_data())
  bad = _write(tmp_path / 'bad.pkl', _corrupt(mmsa_data(), 'test', 'audio',
                                              _set((3, 0, 0), np.nan)))
  text = tmp_path / 'text.pkl'
  text.write_text('hello')
  r = _cli(good)
  assert r.returncode == 0, r.stderr
  assert 'train: N=12' in r.stdout and '(375, 5)' in r.stdout and 'label3' in r.stdout
  for path, words in ((bad, ["'test'", "'audio'", 'example 3', 'NaN']),
                      (str(text), ['not a readable pickle']),
                      (str(tmp_path / 'missing.pkl'), ['not found'])):
    r = _cli(path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in r.stderr, r.stderr
    for word in words:
      assert word in lines[0], (word, lines[0])


# ---------------------------------------------------------------------------- properties

_SMALL = dict(text_len=6, audio_len=7, vision_len=5, audio_dim=2, vision_dim=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_valid_random_splits_are_accepted(n, seed):
  data = make_mmsa(sizes=(n, n, n), seed=seed, **_SMALL)
  splits = mmsa.splits_from_dict(data)
  for name, s in splits.items():
    assert len(s) == n
    assert set(np.unique(s.text_mask)) <= {0.0, 1.0}
    np.testing.assert_array_equal(s.audio_mask.sum(1), data[name]['audio_lengths'])


_FIELDS = ('audio', 'vision', 'regression_labels', 'classification_labels', 'audio_lengths',
           'vision_lengths')


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), field=st.sampled_from(_FIELDS),
       split=st.sampled_from(mmsa.SPLITS), data=st.data())
def test_corrupting_one_value_names_field_split_and_example(seed, field, split, data):
  raw = make_mmsa(sizes=(4, 4, 4), seed=seed, **_SMALL)
  arr = np.array(raw[split][field], dtype=np.float64)
  i = data.draw(st.integers(0, 3), label='example')
  if arr.ndim == 3:
    bad = data.draw(st.sampled_from([np.nan, np.inf]))
    arr[i, data.draw(st.integers(0, arr.shape[1] - 1)), 0] = bad
  elif field == 'regression_labels':
    arr[i] = data.draw(st.one_of(st.floats(3.01, 1e6), st.floats(-1e6, -3.01),
                                 st.just(np.nan)))
  elif field == 'classification_labels':
    arr[i] = data.draw(st.sampled_from([-1.0, 3.0, 0.5, 10.0]))
  else:
    arr[i] = data.draw(st.sampled_from([0, -2, 1000]))
  raw[split][field] = arr
  with pytest.raises(DataError) as err:
    mmsa.splits_from_dict(raw)
  assert (err.value.split, err.value.field, err.value.index) == (split, field, i)
  assert f"split '{split}', field '{field}', example {i}" in str(err.value)
