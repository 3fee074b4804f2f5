"""MELD sentiment CSVs -> an aligned MMSA pickle with placeholder audio and vision.

MELD (Poria et al., ACL 2019) has real utterances with a sentiment label (negative / neutral /
positive) but, in its CSV release, no audio or visual features. This converter makes it usable
where real language matters (word-label biases, `cider_jax.data.ood_split`, the text probe):

  text_bert              the utterance tokenised with the packaged all-MiniLM-L6-v2 tokenizer
                         (bert-base-uncased vocabulary), [CLS] ... [SEP], padded to --text_len
  regression_labels      -1 negative, 0 neutral, +1 positive
  classification_labels  0 / 1 / 2
  audio, vision          PLACEHOLDERS: zeros (N, text_len, 1), aligned with the text
  raw_text, id           the utterance; '<split>_dia<Dialogue_ID>_utt<Utterance_ID>'

MELD's train / dev / test become train / valid / test.

  python -m cider_jax.data.meld MELD_DIR OUT.pkl [--text_len 50]
"""
import argparse
import csv
import os
import pickle
import sys

import numpy as np

from cider_jax.data.validate import DataError

FILES = {'train': 'train_sent_emo.csv', 'valid': 'dev_sent_emo.csv',
         'test': 'test_sent_emo.csv'}
SENTIMENTS = {'negative': 0, 'neutral': 1, 'positive': 2}
_COLUMNS = ('Utterance', 'Sentiment', 'Dialogue_ID', 'Utterance_ID')


def read_csv(path: str):
  """[(utterance, label 0/1/2, id suffix)] from one MELD *_sent_emo.csv."""
  if not os.path.isfile(path):
    raise DataError(f'MELD file not found: expected {path}')
  with open(path, encoding='utf-8', errors='replace', newline='') as f:
    reader = csv.DictReader(f)
    missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
      raise DataError(f'{path}: columns {missing} missing; expected MELD columns {_COLUMNS}')
    rows = []
    for line, row in enumerate(reader, start=2):
      sentiment = row['Sentiment'].strip().lower()
      if sentiment not in SENTIMENTS:
        raise DataError(f'{path}, line {line}: Sentiment is {row["Sentiment"]!r}; expected one '
                        f'of {sorted(SENTIMENTS)}')
      rows.append((' '.join(row['Utterance'].split()), SENTIMENTS[sentiment],
                   f'dia{row["Dialogue_ID"]}_utt{row["Utterance_ID"]}'))
  return rows


def to_split(rows, split, tokenizer, text_len):
  """One MMSA split dict (aligned, placeholder audio/vision) from read_csv rows."""
  texts = [r[0] for r in rows]
  enc = tokenizer(texts, padding='max_length', truncation=True, max_length=text_len,
                  return_tensors='np')
  labels = np.array([r[1] for r in rows], np.int64)
  n = len(rows)
  return {
      'text_bert': np.stack([enc['input_ids'], enc['attention_mask'], enc['token_type_ids']],
                            axis=1).astype(np.float32),
      'audio': np.zeros((n, text_len, 1), np.float32),
      'vision': np.zeros((n, text_len, 1), np.float32),
      'regression_labels': (labels - 1).astype(np.float32),
      'classification_labels': labels,
      'raw_text': np.array(texts, dtype=object),
      'id': np.array([f'{split}_{r[2]}' for r in rows], dtype=object),
  }


def convert(meld_dir: str, text_len: int = 50, tokenizer=None) -> dict:
  """{train, valid, test} MMSA dicts from the MELD CSVs in `meld_dir`."""
  if tokenizer is None:
    from cider_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    tokenizer = synthetic.load_tokenizer()
  return {s: to_split(read_csv(os.path.join(meld_dir, name)), s, tokenizer, text_len)
          for s, name in FILES.items()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m cider_jax.data.meld',
      description='Convert MELD sentiment CSVs (real text, no features) into an aligned MMSA '
      'pickle whose audio and vision are zero placeholders.')
  parser.add_argument('meld_dir', help='folder with {train,dev,test}_sent_emo.csv')
  parser.add_argument('output', help='MMSA pickle to write')
  parser.add_argument('--text_len', type=int, default=50, help='token positions L (default 50)')
  args = parser.parse_args(argv)
  if args.text_len < 3:
    print(f'error: --text_len is {args.text_len}; expected >= 3', file=sys.stderr)
    return 1
  try:
    data = convert(args.meld_dir, args.text_len)
  except DataError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, 'wb') as f:
    pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
  print(f'wrote {args.output}: ' + ', '.join(f'{s} {len(d["id"])}' for s, d in data.items())
        + ' (audio and vision are zero placeholders)')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
