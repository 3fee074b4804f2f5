"""OOD repartition (cider_jax.data.ood_split): the bias score, the quotas, the assignment on a
hand-made pool, every example once with its fields, the validator, determinism, the CLI, and
the size of the shift on generated data without a planted shift."""
import json
import math
import os
import pickle

import joblib
import numpy as np
import pytest

from cider_jax.data import mmsa, ood_split, probe
from tests.conftest import make_mmsa

CLS, SEP = 101, 102


def _write(path, data):
  with open(path, 'wb') as f:
    pickle.dump(data, f)
  return str(path)


def _split_from_texts(texts, labels, prefix, text_len=8, aligned=True):
  """An MMSA split whose example i is [CLS] texts[i] [SEP], label labels[i] (0/1/2)."""
  n = len(texts)
  ids = np.zeros((n, text_len))
  mask = np.zeros((n, text_len))
  for i, words in enumerate(texts):
    row = [CLS, *words, SEP]
    ids[i, :len(row)] = row
    mask[i, :len(row)] = 1
  labels = np.asarray(labels)
  split = {
      'text_bert': np.stack([ids, mask, np.zeros_like(ids)], axis=1),
      'audio': np.arange(n * text_len * 2, dtype=np.float64).reshape(n, text_len, 2),
      'vision': np.ones((n, text_len, 3)),
      'regression_labels': (labels - 1).astype(float),
      'classification_labels': labels.astype(float),
      'raw_text': np.array([f'{prefix} {i}' for i in range(n)], dtype=object),
      'id': np.array([f'{prefix}{i}' for i in range(n)], dtype=object),
  }
  if not aligned:
    split['audio_lengths'] = np.full(n, 2)
    split['vision_lengths'] = np.full(n, 3)
  return split


def _hand_made_pool():
  """Ten one-word texts, 5 negative and 5 positive, sizes 6 / 2 / 2. Word 2000 goes with
  positive (4 positive, 1 negative example), word 2001 with negative (4 negative, 1
  positive). The two bias-conflicting examples are the negative one with 2000 (id 'b0') and
  the positive one with 2001 (id 'c0')."""
  pos_word, neg_word = 2000, 2001
  return {
      'train': _split_from_texts([[pos_word]] * 4 + [[neg_word]] * 2, [2, 2, 2, 2, 0, 0], 'a'),
      'valid': _split_from_texts([[pos_word], [neg_word]], [0, 0], 'b'),
      'test': _split_from_texts([[neg_word]] * 2, [2, 0], 'c'),
  }


# ---------------------------------------------------------------------------- pieces


def test_bias_score_is_leave_one_out_pmi_by_hand():
  # one word in three examples, labels 0, 0, 2; prior (2/3, 0, 1/3); smoothing 1
  present = np.array([[True], [True], [True]])
  labels = np.array([0, 0, 2])
  counts = np.array([[2, 0, 1]])
  prior = np.array([2 / 3, 0.0, 1 / 3])
  scores = ood_split.bias_scores(present, labels, counts, prior)
  # label 0: p(0 | w) without i = (1 + 2/3) / (2 + 1) = 5/9; / p(0) = 5/6
  # label 2: p(2 | w) without i = (0 + 1/3) / (2 + 1) = 1/9; / p(2) = 1/3
  np.testing.assert_allclose(scores, [math.log(5 / 6), math.log(5 / 6), math.log(1 / 3)],
                             rtol=1e-12)


def test_bias_score_sums_words_and_ignores_absent_ones():
  present = np.array([[True, True], [True, False], [False, True]])
  labels = np.array([0, 1, 1])
  counts = np.array([[1, 1], [1, 1]])
  prior = np.array([0.5, 0.5])
  # ex 0: word 0 -> (0 + .5) / (1 + 1) / .5 = 1/2; word 1 -> same: log(1/4)
  # ex 1: word 0 -> (0 + .5) / 2 / .5 = 1/2;  ex 2: word 1 -> 1/2
  np.testing.assert_allclose(ood_split.bias_scores(present, labels, counts, prior),
                             [math.log(0.25), math.log(0.5), math.log(0.5)], rtol=1e-12)


def test_class_quotas_by_hand():
  labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
  quotas = ood_split.class_quotas(labels, {'train': 5, 'valid': 2, 'test': 3}, 3)
  # train: 5 * (.5, .3, .2) = (2.5, 1.5, 1) -> (3, 1, 1) (tie on the remainder: first class)
  # valid: 2 * (2, 2, 1) / 5 = (.8, .8, .4) -> (1, 1, 0); test: the rest (1, 1, 1)
  # rows are classes, columns train / valid / test
  np.testing.assert_array_equal(quotas, [[3, 1, 1], [1, 1, 1], [1, 0, 1]])


def test_presence_marks_attended_words_only():
  ids = np.array([[101, 7, 9, 102, 7], [101, 9, 102, 0, 0]])
  mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(ood_split.presence(ids, mask, np.array([7, 9, 5])),
                                [[True, True, False], [False, True, False]])


def test_sparse_bag_of_words_matches_dense_one():
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 40, (30, 9))
  mask = (np.arange(9)[None] < rng.integers(1, 10, 30)[:, None]).astype(float)
  vocab = np.array([1, 3, 5, 17, 39])
  np.testing.assert_array_equal(probe.bag_of_words_sparse(ids, mask, vocab),
                                probe.bag_of_words(ids, mask, vocab))


def test_text_probe_learns_a_word_rule():
  ids = np.array([[CLS, 2000, SEP], [CLS, 2001, SEP]] * 20)
  mask = np.ones_like(ids)
  labels = np.array([0, 2] * 20)
  acc = probe.text_probe(ids, mask, labels, {'flipped': (ids, mask, 2 - labels),
                                             'same': (ids, mask, labels)}, 3)
  assert acc == {'flipped': 0.0, 'same': 1.0}


# ---------------------------------------------------------------------------- repartition


def test_hand_made_pool_puts_the_conflicting_examples_in_test():
  data = _hand_made_pool()
  new, report = ood_split.repartition(data, 'binary', strength=100.0, min_count=2,
                                      run_probe=False)
  # quotas: train 3 + 3, valid 1 + 1, test 1 + 1 (negative + positive): each class's least
  # bias-consistent example goes to test
  assert sorted(new['test']['id']) == ['b0', 'c0']
  assert report['sizes'] == {'train': 6, 'valid': 2, 'test': 2}
  # in the pool 2000 goes with positive; in train it is perfectly positive, in test negative
  words = {row['id']: row for row in report['bias_words']}
  assert words[2000]['class'] == 2 and words[2001]['class'] == 0
  assert words[2000]['train']['p_class'] == 1.0 and words[2000]['test']['p_class'] == 0.0


@pytest.mark.parametrize('aligned', [True, False])
def test_every_example_once_with_its_fields(aligned):
  data = make_mmsa((30, 10, 14), aligned=aligned)
  new, _ = ood_split.repartition(data, 'binary', seed=3, run_probe=False)
  assert {s: len(new[s]['id']) for s in new} == {'train': 30, 'valid': 10, 'test': 14}
  # make_mmsa reuses ids across splits; raw_text + audio identify the example
  seen = []
  for s in new:
    for j in range(len(new[s]['id'])):
      matches = [(so, i) for so in data for i in range(len(data[so]['id']))
                 if data[so]['id'][i] == new[s]['id'][j]
                 and np.array_equal(data[so]['audio'][i], new[s]['audio'][j])]
      assert len(matches) == 1
      so, i = matches[0]
      seen.append((so, i))
      for field in data[so]:
        np.testing.assert_array_equal(np.asarray(new[s][field][j]),
                                      np.asarray(data[so][field][i]), err_msg=field)
  assert len(seen) == len(set(seen)) == 54
  assert set(new['train']) == set(data['train'])


@pytest.mark.parametrize('aligned', [True, False])
def test_validator_accepts_the_output_written_by_the_cli(tmp_path, aligned, capsys):
  source = make_mmsa((30, 10, 14), aligned=aligned)
  for s in source:   # ids unique over the pool
    source[s]['id'] = np.array([f'{s}{k}$_$1' for k in range(len(source[s]['id']))], object)
  src = _write(tmp_path / 'in.pkl', source)
  out = str(tmp_path / 'out' / 'ood.pkl')
  assert ood_split.main([src, out, '--task', 'seven', '--seed', '1']) == 0
  splits = mmsa.load_mmsa(out, aligned=aligned)
  assert [len(splits[s]) for s in mmsa.SPLITS] == [30, 10, 14]
  assert mmsa.main([out]) == 0
  with open(os.path.join(tmp_path, 'out', 'ood.json')) as f:
    report = json.load(f)
  assert report['sizes'] == {'train': 30, 'valid': 10, 'test': 14}
  assert set(report['probe']) == {'this_split', 'random_split', 'test_drop'}
  assert 'text probe accuracy' in capsys.readouterr().out
  # the validator read exactly the written examples: every id of the input once, with its
  # own features and label
  by_id = {i: (s, k) for s in source for k, i in enumerate(source[s]['id'])}
  seen = []
  for name in mmsa.SPLITS:
    with open(out, 'rb') as f:
      written = pickle.load(f)[name]
    for k, i in enumerate(written['id']):
      s, j = by_id[i]
      np.testing.assert_array_equal(written['audio'][k], source[s]['audio'][j])
      assert written['classification_labels'][k] == source[s]['classification_labels'][j]
      seen.append(i)
  assert sorted(seen) == sorted(by_id)


def test_fields_not_per_example_are_dropped_and_listed():
  data = make_mmsa((12, 5, 7))
  data['train']['annotations'] = np.array(['x'] * 12, dtype=object)   # train only
  for s in data:
    data[s]['feature_names'] = np.array(['a', 'b'])                   # not one row per example
  new, report = ood_split.repartition(data, 'binary', run_probe=False)
  assert report['dropped_fields'] == ['annotations', 'feature_names']
  assert 'annotations' not in new['train'] and 'audio' in new['test']
  assert len(mmsa.splits_from_dict(new)['test']) == 7


def test_reads_joblib_files(tmp_path):
  src = str(tmp_path / 'MOSI_aligned_50.pkl')
  joblib.dump(_hand_made_pool(), src, compress=3)
  plain = _write(tmp_path / 'plain.pkl', _hand_made_pool())
  outs = [str(tmp_path / 'a.pkl'), str(tmp_path / 'b.pkl')]
  for path, out in zip((src, plain), outs):
    assert ood_split.main([path, out, '--task', 'binary', '--min_count', '2', '--strength', '100',
                           '--no_probe']) == 0
  joblib_out, plain_out = (mmsa.load_mmsa(out) for out in outs)
  assert sorted(joblib_out['test'].ids) == sorted(plain_out['test'].ids) == ['b0', 'c0']


def test_deterministic_from_the_seed():
  data = make_mmsa((30, 10, 14))
  runs = [ood_split.repartition(data, 'binary', seed=seed, run_probe=False)[0]['test']['raw_text']
          for seed in (5, 5, 6)]
  np.testing.assert_array_equal(runs[0], runs[1])
  assert list(runs[0]) != list(runs[2])


def test_label_distributions_follow_the_pool_unless_label_shift():
  data = make_mmsa((60, 20, 40))
  pool = np.concatenate([data[s]['classification_labels'] for s in data]).astype(int)
  new, _ = ood_split.repartition(data, 'binary', strength=5.0, run_probe=False)
  quotas = ood_split.class_quotas(pool, {'train': 60, 'valid': 20, 'test': 40}, 3)
  for c, s in enumerate(('train', 'valid', 'test')):
    np.testing.assert_array_equal(
        np.bincount(new[s]['classification_labels'].astype(int), minlength=3), quotas[:, c])
  shifted, _ = ood_split.repartition(data, 'binary', strength=5.0, label_shift=True,
                                     run_probe=False)
  assert [len(shifted[s]['id']) for s in shifted] == [60, 20, 40]


def test_label_shift_ranks_the_whole_pool():
  """By hand: 10 examples a class, bias scores higher for class 2 than 1 than 0, strength so
  large that the noise only orders examples within a class. With label_shift the 18 most
  bias-consistent (all of class 2, 8 of class 1) fill train and valid, the test gets the other
  2 of class 1 and all of class 0; without it every split keeps the pool's distribution."""
  labels = np.repeat([0, 1, 2], 10)
  scores = labels.astype(float) + np.tile(np.linspace(0, 0.5, 10), 3)
  sizes = {'train': 12, 'valid': 6, 'test': 12}
  counts = lambda codes, split: np.bincount(labels[codes == split], minlength=3).tolist()
  codes = ood_split.assign(scores, labels, sizes, 3, strength=1e6,
                           rng=np.random.default_rng(0), label_shift=True)
  assert counts(codes, 2) == [10, 2, 0]
  assert (np.add(counts(codes, 0), counts(codes, 1)) == [0, 8, 10]).all()
  assert [int((codes == k).sum()) for k in range(3)] == [12, 6, 12]
  codes = ood_split.assign(scores, labels, sizes, 3, strength=1e6,
                           rng=np.random.default_rng(0), label_shift=False)
  assert counts(codes, 0) == [4, 4, 4] and counts(codes, 1) == [2, 2, 2]
  assert counts(codes, 2) == [4, 4, 4]
  # within each class the most bias-consistent go to train or valid, the least to test
  for c in range(3):
    member = labels == c
    assert scores[member & (codes == 2)].max() < scores[member & (codes != 2)].min()


def test_valid_like_test_is_drawn_from_the_conflicting_end():
  data = make_mmsa((60, 20, 40))
  _, like_train = ood_split.repartition(data, 'binary', strength=5.0, run_probe=False)
  _, like_test = ood_split.repartition(data, 'binary', strength=5.0, valid_mode='like_test',
                                       run_probe=False)
  score = lambda r, s: r['mean_bias_score'][s]
  assert score(like_train, 'valid') > score(like_train, 'test')
  assert score(like_test, 'valid') < score(like_test, 'train')


def test_cli_errors_are_one_line(tmp_path, capsys):
  assert ood_split.main([str(tmp_path / 'missing.pkl'), str(tmp_path / 'o.pkl'),
                         '--task', 'binary']) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith('error: ') and 'missing.pkl' in err
  src = _write(tmp_path / 'in.pkl', make_mmsa())
  assert ood_split.main([src, str(tmp_path / 'o.pkl'), '--task', 'binary',
                         '--strength', '-1']) == 1
  assert '--strength' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    ood_split.main([src, str(tmp_path / 'o.pkl'), '--task', 'three'])


# ---------------------------------------------------------------------------- the shift


def _iid_pool(n=1500, vocab=150, seed=0):
  """Texts whose words are drawn i.i.d. given the label, p(word | class) = 0.65 * a shared
  distribution + 0.35 * a class's own: words weakly tied to labels, one distribution, no
  planted shift. Sizes 60/15/25 %."""
  rng = np.random.default_rng(seed)
  labels = rng.choice(3, n, p=(0.4, 0.2, 0.4))
  word_probs = (0.65 * rng.dirichlet(np.full(vocab, 1.0))[None]
                + 0.35 * rng.dirichlet(np.full(vocab, 0.3), size=3))   # (3, vocab)
  lengths = rng.integers(3, 9, n)
  texts = [list(2000 + rng.choice(vocab, k, p=word_probs[y])) for y, k in zip(labels, lengths)]
  cut = np.cumsum([int(0.6 * n), int(0.15 * n)])
  parts = np.split(np.arange(n), cut)
  return {s: _split_from_texts([texts[i] for i in idx], labels[idx], s, text_len=12)
          for s, idx in zip(('train', 'valid', 'test'), parts)}


def test_probe_drops_at_default_strength_and_not_at_zero():
  data = _iid_pool()
  _, iid = ood_split.repartition(data, 'binary', strength=0.0, seed=0)
  _, ood = ood_split.repartition(data, 'binary', seed=0)
  for report in (iid, ood):
    random_acc = report['probe']['random_split']['test']
    assert random_acc > 0.6   # the words carry the label: well above the 0.4 majority
  # strength 0 and the reference are two independent random splits: test sets of 375
  # examples, accuracy standard deviation ~0.025, so a gap within 0.06 is noise
  assert abs(iid['probe']['test_drop']) < 0.06
  assert ood['probe']['test_drop'] >= 0.05


# ---------------------------------------------------------------------------- using the output


def test_training_config_reads_the_output_by_file_or_by_ood_layout(tmp_path):
  from configs import ood  # pylint: disable=g-import-not-at-top
  src = _write(tmp_path / 'in.pkl', make_mmsa((30, 10, 14), aligned=True))
  layout = tmp_path / 'data' / 'OOD_MOSI' / 'binary' / 'MOSI_aligned_50.pkl'
  assert ood_split.main([src, str(layout), '--task', 'binary', '--no_probe']) == 0
  by_dir = ood.get_config()
  by_dir.data.dir, by_dir.data.aligned = str(tmp_path / 'data'), True
  by_file = ood.get_config()
  by_file.data.file, by_file.data.aligned = str(layout), True
  for config in (by_dir, by_file):
    splits = mmsa.load_mmsa(config)
    assert [len(splits[s]) for s in mmsa.SPLITS] == [30, 10, 14]


def test_meld_csvs_become_an_aligned_pickle_with_placeholders(tmp_path):
  from cider_jax.data import meld  # pylint: disable=g-import-not-at-top
  header = ('Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,'
            'Episode,StartTime,EndTime\n')
  rows = {'train': ['1,Oh my God!,Monica,surprise,positive,0,0,1,1,a,b',
                    '2,No.,Ross,sadness,negative,0,1,1,1,a,b'],
          'dev': ['1,"Okay, fine.",Joey,neutral,neutral,3,2,1,1,a,b'],
          'test': ['1,I hate this,Rachel,anger,negative,7,0,1,1,a,b']}
  for name, lines in rows.items():
    (tmp_path / f'{name}_sent_emo.csv').write_text(header + '\n'.join(lines) + '\n')
  out = str(tmp_path / 'meld.pkl')
  assert meld.main([str(tmp_path), out, '--text_len', '12']) == 0
  splits = mmsa.load_mmsa(out, aligned=True)
  np.testing.assert_array_equal(splits['train'].label3, [2, 0])
  np.testing.assert_array_equal(splits['train'].score, [1.0, -1.0])
  assert list(splits['valid'].ids) == ['valid_dia3_utt2']
  assert list(splits['valid'].raw_text) == ['Okay, fine.']
  assert splits['test'].audio.shape == (1, 12, 1) and not splits['test'].audio.any()
  # "i hate this": [CLS] i hate this [SEP]
  assert splits['test'].text_lengths[0] == 5
  (tmp_path / 'test_sent_emo.csv').write_text(header + '1,Hm,Ross,joy,happy,0,0,1,1,a,b\n')
  assert meld.main([str(tmp_path), out]) == 1
