"""TFDS builders: array_record round trip without TensorFlow, index field, clear errors."""
import os
import pickle
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cider_jax.data import builders, mmsa, synthetic
from cider_jax.data.builders import mmsa_builder

SMALL = dict(seed=1, n_train=40, n_valid=12, n_test=10, text_len=16, audio_len=20,
             vision_len=24, audio_dim=5, vision_dim=20)


def _config(**data):
  cfg = ml_collections.ConfigDict({
      'task': 'binary',
      'data': dict(source='synthetic', dir='', file='', dataset='mosi', aligned=False,
                   setting='iid', cache_dir='', synthetic=dict(SMALL))})
  cfg.data.update(data)
  return cfg


def test_tensorflow_is_not_installed():
  r = subprocess.run([sys.executable, '-c', 'import tensorflow'], capture_output=True)
  assert r.returncode != 0


def _assert_round_trip(ds, split, task='binary'):
  assert len(ds) == len(split)
  seen = []
  for r in range(len(ds)):
    ex = ds[r]
    i = int(ex['index'])
    seen.append(i)
    for key in ('text_ids', 'text_mask', 'text_segments', 'audio', 'audio_mask', 'vision',
                'vision_mask'):
      np.testing.assert_array_equal(ex[key], getattr(split, key)[i], err_msg=key)
      assert ex[key].dtype == getattr(split, key).dtype, key
    assert ex['label'] == split.labels(task)[i]
  assert sorted(seen) == list(range(len(split)))
  return seen


def test_synthetic_round_trip_via_tfds_data_source(tmp_path):
  cfg = _config()
  data_dir = str(tmp_path / 'tfds')
  src = builders.build_source(cfg, 'valid', data_dir)
  splits = mmsa.splits_from_dict(synthetic.generate(cfg))
  order = _assert_round_trip(src, splits['valid'])
  assert order != sorted(order)  # records really are shuffled: the index field is needed
  name = builders.make_builder(cfg, data_dir).builder_config.name
  ds = tfds.data_source(f'cider_synthetic/{name}', data_dir=data_dir, split='test')
  for r in range(len(ds)):
    rec = ds[r]
    i = int(rec['index'])
    np.testing.assert_array_equal(rec['audio'], splits['test'].audio[i])
    assert rec['label7'] == splits['test'].label7[i]
    assert rec['id'].decode() == splits['test'].ids[i]
  assert 'tensorflow' not in sys.modules


def test_second_build_reuses_records(tmp_path, monkeypatch):
  cfg = _config()
  data_dir = str(tmp_path / 'tfds')
  builders.build_source(cfg, 'train', data_dir)
  monkeypatch.setattr(synthetic, 'generate', lambda *a, **k: pytest.fail('rebuilt'))
  assert len(builders.build_source(cfg, 'train', data_dir)) == 40


def test_mosi_builder_reads_manual_dir_layout(tmp_path, mmsa_data):
  root = tmp_path / 'mmsa'
  folder = root / 'CMU-MOSI' / 'Processed'
  folder.mkdir(parents=True)
  data = mmsa_data(sizes=(9, 4, 5), audio_len=30, vision_len=40)
  with open(folder / 'unaligned_50.pkl', 'wb') as f:
    pickle.dump(data, f)
  cfg = _config(source='mmsa', dir=str(root))
  cfg.task = 'seven'
  data_dir = str(tmp_path / 'tfds')
  src = builders.build_source(cfg, 'train', data_dir)
  splits = mmsa.load_mmsa(str(folder / 'unaligned_50.pkl'))
  _assert_round_trip(src, splits['train'], task='seven')
  ds = tfds.data_source('cider_mosi/unaligned', data_dir=data_dir, split='test')
  assert sorted(int(ds[r]['index']) for r in range(len(ds))) == list(range(5))


def test_mmsa_missing_file_is_one_clear_error(tmp_path):
  cfg = _config(source='mmsa', dir=str(tmp_path), aligned=True, setting='ood')
  with pytest.raises(mmsa.DataError, match=r'not found: expected .*OOD_MOSI/binary/MOSI_aligned_50\.pkl'):
    builders.build_source(cfg, 'train', str(tmp_path / 'tfds'))
  assert not os.path.exists(tmp_path / 'tfds' / 'cider_mosi' / 'ood_binary_aligned' / '1.0.0'
                            / 'dataset_info.json')


def test_explicit_file_config_and_unknown_setting(tmp_path, mmsa_data):
  path = tmp_path / 'mine.pkl'
  with open(path, 'wb') as f:
    pickle.dump(mmsa_data(sizes=(3, 2, 2), audio_len=10, vision_len=10), f)
  cfg = _config(source='mmsa', file=str(path))
  config = builders.make_builder(cfg, str(tmp_path / 'tfds')).builder_config
  assert config.name.startswith('file_') and config.file == str(path)
  assert len(builders.build_source(cfg, 'valid', str(tmp_path / 'tfds'))) == 2
  assert {c.name for c in mmsa_builder.standard_configs('mosei', with_ood=False)} == {
      'unaligned', 'aligned', 'cross_dataset'}
  with pytest.raises(mmsa.DataError, match='ood_binary_unaligned'):
    builders.make_builder(_config(source='mmsa', dataset='mosei', setting='ood', dir='/x'),
                          str(tmp_path))
