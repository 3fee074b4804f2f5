"""Input pipeline: batch keys/shapes, eval padding, shuffling, sharding, iterator state."""
import grain
import ml_collections
import numpy as np
import pytest

from cider_jax.data import load_splits, mmsa, pipeline
from tests.conftest import make_mmsa

SHAPES = dict(text_len=10, audio_len=12, vision_len=9, audio_dim=5, vision_dim=20)
DTYPES = {'text_ids': np.int32, 'text_mask': np.float32, 'text_segments': np.int32,
          'audio': np.float32, 'audio_mask': np.float32, 'vision': np.float32,
          'vision_mask': np.float32, 'label': np.int32, 'valid': np.float32,
          'index': np.int32}


@pytest.fixture(scope='module')
def splits():
  return mmsa.splits_from_dict(make_mmsa(sizes=(23, 10, 7), **SHAPES))


def _check_batch(batch, b):
  assert tuple(batch) == pipeline.BATCH_KEYS
  assert set(batch) == set(DTYPES)
  expected = {'text_ids': (b, 10), 'text_mask': (b, 10), 'text_segments': (b, 10),
              'audio': (b, 12, 5), 'audio_mask': (b, 12), 'vision': (b, 9, 20),
              'vision_mask': (b, 9), 'label': (b,), 'valid': (b,), 'index': (b,)}
  for k, v in batch.items():
    assert isinstance(v, np.ndarray), k
    assert v.shape == expected[k] and v.dtype == DTYPES[k], (k, v.shape, v.dtype)


def test_eval_batches_pad_last_batch_and_cover_split_once(splits):
  split = splits['train']
  arrays = pipeline.split_to_arrays(split, 'seven')
  batches = list(pipeline.eval_batches(arrays, 8))
  assert len(batches) == pipeline.num_eval_batches(23, 8) == 3
  for b in batches:
    _check_batch(b, 8)
  valid = np.concatenate([b['valid'] for b in batches])
  index = np.concatenate([b['index'] for b in batches])
  np.testing.assert_array_equal(valid, [1] * 23 + [0] * 1)
  np.testing.assert_array_equal(index[valid == 1], np.arange(23))  # in order, once each
  last = batches[-1]
  np.testing.assert_array_equal(last['valid'], [1] * 7 + [0])
  np.testing.assert_array_equal(last['audio'][7], split.audio[last['index'][7]])
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches])[:23], split.label7)
  # a Split works too, given the task; exact multiples need no padding
  full = list(pipeline.eval_batches(splits['valid'], 5, task='binary'))
  assert len(full) == 2 and all(b['valid'].all() for b in full)


def test_train_batches_fixed_shapes_and_epoch_coverage(splits):
  src = pipeline.split_to_examples(splits['train'], 'binary')
  it = pipeline.train_iterator(src, 4, seed=7, num_epochs=2, shard=(0, 1))
  batches = list(it)
  spe = pipeline.steps_per_epoch(23, 4)
  assert len(batches) == 2 * spe == 10
  for b in batches:
    _check_batch(b, 4)
    assert b['valid'].all()
    np.testing.assert_array_equal(b['label'], splits['train'].label3[b['index']])
    np.testing.assert_array_equal(b['audio'], splits['train'].audio[b['index']])
  for e in range(2):
    idx = np.concatenate([b['index'] for b in batches[e * spe:(e + 1) * spe]])
    assert len(set(idx)) == len(idx) == 20  # no duplicates within an epoch; 3 dropped


def _order(src, seed, epochs=3, shard=(0, 1), batch=4):
  it = pipeline.train_iterator(src, batch, seed=seed, num_epochs=epochs, shard=shard)
  return [b['index'].tolist() for b in it]


def test_shuffle_differs_across_epochs_and_is_reproducible(splits):
  src = pipeline.split_to_examples(splits['train'], 'binary')
  a = _order(src, seed=3)
  assert a == _order(src, seed=3)
  assert a != _order(src, seed=4)
  spe = len(a) // 3
  epochs = [sum(a[e * spe:(e + 1) * spe], []) for e in range(3)]
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
  assert epochs[0] != sorted(epochs[0])


def test_iterator_state_restores_to_the_same_next_batch(splits):
  src = pipeline.split_to_examples(splits['train'], 'binary')
  it = pipeline.train_iterator(src, 4, seed=11, num_epochs=3, shard=(0, 1))
  for _ in range(7):  # crosses an epoch boundary (5 batches per epoch)
    next(it)
  state = it.get_state()
  expected = [next(it)['index'].tolist() for _ in range(4)]
  fresh = pipeline.train_iterator(src, 4, seed=11, num_epochs=3, shard=(0, 1))
  fresh.set_state(state)
  assert [next(fresh)['index'].tolist() for _ in range(4)] == expected
  assert isinstance(fresh, grain.DatasetIterator)


def test_two_hosts_get_disjoint_covering_shards(splits):
  src = pipeline.split_to_examples(splits['valid'], 'binary')  # 10 examples
  shards = [_order(src, seed=5, epochs=2, shard=(h, 2), batch=1) for h in range(2)]
  assert len(shards[0]) == len(shards[1]) == 10  # 5 per host per epoch
  for e in range(2):
    per_host = [set(sum(s[e * 5:(e + 1) * 5], [])) for s in shards]
    assert not per_host[0] & per_host[1]
    assert per_host[0] | per_host[1] == set(range(10))
  # odd sizes: equal shards, at most process_count - 1 examples left out per epoch
  odd = pipeline.split_to_examples(splits['test'], 'binary')  # 7 examples
  shards = [_order(odd, seed=5, epochs=1, shard=(h, 2), batch=1) for h in range(2)]
  assert len(shards[0]) == len(shards[1]) == 3
  assert not set(sum(shards[0], [])) & set(sum(shards[1], []))


def test_train_iterator_argument_errors(splits):
  src = pipeline.split_to_examples(splits['test'], 'binary')
  with pytest.raises(mmsa.DataError, match='fewer than the batch size'):
    pipeline.train_iterator(src, 8, seed=0, shard=(0, 1))
  with pytest.raises(ValueError, match='shard'):
    pipeline.train_iterator(src, 2, seed=0, shard=(2, 2))


def test_load_splits_dispatches_on_source(tmp_path):
  cfg = ml_collections.ConfigDict({
      'task': 'binary',
      'data': dict(source='synthetic', dir='', file='', dataset='mosi', aligned=False,
                   setting='iid', cache_dir='',
                   synthetic=dict(seed=2, n_train=30, n_valid=10, n_test=10, text_len=16,
                                  audio_len=20, vision_len=20, audio_dim=5, vision_dim=20))})
  splits = load_splits(cfg, str(tmp_path))
  assert [len(splits[k]) for k in ('train', 'valid', 'test')] == [30, 10, 10]
  assert list((tmp_path / 'data').glob('synthetic-*.pkl'))
  cfg.data.source = 'mmsa'
  cfg.data.dir = str(tmp_path)
  with pytest.raises(mmsa.DataError, match='CMU-MOSI/Processed/unaligned_50.pkl'):
    load_splits(cfg, str(tmp_path))
  cfg.data.source = 'csv'
  with pytest.raises(mmsa.DataError, match="'mmsa' or 'synthetic'"):
    load_splits(cfg, str(tmp_path))


def test_tfds_source_feeds_the_train_iterator(tmp_path):
  cfg = ml_collections.ConfigDict({
      'task': 'seven',
      'data': dict(source='synthetic', dir='', file='', dataset='mosi', aligned=False,
                   setting='iid', cache_dir=str(tmp_path / 'cache'),
                   synthetic=dict(seed=2, n_train=30, n_valid=10, n_test=10, text_len=16,
                                  audio_len=20, vision_len=20, audio_dim=5, vision_dim=20))})
  splits = load_splits(cfg)
  src = pipeline.build_train_source(cfg)
  batches = list(pipeline.train_iterator(src, 8, seed=1, num_epochs=1, shard=(0, 1)))
  assert len(batches) == 3
  for b in batches:
    np.testing.assert_array_equal(b['vision'], splits['train'].vision[b['index']])
    np.testing.assert_array_equal(b['label'], splits['train'].label7[b['index']])


def test_eval_batches_carry_keep_masks(splits):
  split = splits['test']  # 7 examples
  rng = np.random.default_rng(0)
  keeps = tuple((rng.random(m.shape) > 0.5).astype(np.float32) * m
                for m in (split.text_mask, split.audio_mask, split.vision_mask))
  batches = list(pipeline.eval_batches(split, 'binary', 4, keeps=keeps))  # (split, task, B)
  assert len(batches) == 2
  assert tuple(batches[0]) == pipeline.BATCH_KEYS + pipeline.KEEP_KEYS
  for b in batches:
    for k, keep in zip(pipeline.KEEP_KEYS, keeps):
      np.testing.assert_array_equal(b[k], keep[b['index']])
      assert b[k].dtype == np.float32
  with pytest.raises(ValueError, match='text_keep has shape'):
    next(pipeline.eval_batches(split, 4, 'binary', keeps=(keeps[0][:, :3],) + keeps[1:]))


def test_split_input_shard_options_and_epoch_position(splits):
  split = splits['train']  # 23 examples, 5 batches of 4 per epoch
  it = pipeline.train_iterator(split, 4, seed=2, task='seven',
                               shard=grain.sharding.ShardOptions(0, 1))
  spe = pipeline.steps_per_epoch(split, 4, shard_count=1)
  assert spe == 5
  positions = []
  for _ in range(12):  # no num_epochs: repeats forever
    b = next(it)
    positions.append(pipeline.position_in_epoch(it, spe))
    np.testing.assert_array_equal(b['label'], split.label7[b['index']])
  assert positions == [1, 2, 3, 4, 0] * 2 + [1, 2]
  state = pipeline.get_iterator_state(it)
  again = pipeline.train_iterator(split, 4, seed=2, task='seven', shard=(0, 1))
  pipeline.set_iterator_state(again, state)
  np.testing.assert_array_equal(next(again)['index'], next(it)['index'])
  assert pipeline.steps_per_epoch(23, 4, shard_count=2) == 2
  with pytest.raises(ValueError, match='needs task'):
    pipeline.train_iterator(split, 4, seed=2, shard=(0, 1))
