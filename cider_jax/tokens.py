"""Ids of the BERT special tokens ([PAD], [UNK], [CLS], [SEP], [MASK]), defined once.

  tokens.BERT                          # bert-base-uncased's (all-MiniLM-L6-v2 shares them)
  tokens.from_tokenizer_dir(folder)    # a tokenizer / BERT folder's vocab.txt or tokenizer.json

Every text is [CLS] ... [SEP] then [PAD]s; a dropped token becomes [UNK] (`masks.apply_keep`),
a token outside the bias vocabulary [MASK] (`counterfactual`). Code that has a tokenizer folder
reads the ids from it; the rest takes the bert-base-uncased values of `BERT`.
"""
import dataclasses
import json
import os
from typing import Mapping, Tuple


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """Ids of the special tokens; the defaults are those of the bert-base-uncased vocabulary."""
  pad: int = 0
  unk: int = 100
  cls: int = 101
  sep: int = 102
  mask: int = 103

  @property
  def ids(self) -> Tuple[int, ...]:
    """(pad, unk, cls, sep, mask)."""
    return (self.pad, self.unk, self.cls, self.sep, self.mask)


BERT = SpecialTokens()

# field of SpecialTokens -> the token's text in a BERT vocabulary
_TOKENS = {'pad': '[PAD]', 'unk': '[UNK]', 'cls': '[CLS]', 'sep': '[SEP]', 'mask': '[MASK]'}
VOCAB_FILES = ('vocab.txt', 'tokenizer.json')


def _from_mapping(vocab: Mapping[str, int], source: str) -> SpecialTokens:
  missing = [token for token in _TOKENS.values() if token not in vocab]
  if missing:
    raise ValueError(f'{source}: the vocabulary has no {", ".join(missing)}; expected a BERT '
                     'WordPiece vocabulary')
  return SpecialTokens(**{field: int(vocab[token]) for field, token in _TOKENS.items()})


def from_vocab(path: str) -> SpecialTokens:
  """The special tokens of a WordPiece vocab.txt (one token a line; its id is the line number)."""
  vocab = {}
  with open(path, encoding='utf-8') as f:
    for i, line in enumerate(f):
      vocab.setdefault(line.rstrip('\n'), i)
  return _from_mapping(vocab, path)


def from_tokenizer_json(path: str) -> SpecialTokens:
  """The special tokens of a Hugging Face tokenizer.json (its added tokens, then its vocab)."""
  with open(path, encoding='utf-8') as f:
    data = json.load(f)
  vocab = dict((data.get('model') or {}).get('vocab') or {})
  vocab.update({t['content']: t['id'] for t in data.get('added_tokens') or ()})
  return _from_mapping(vocab, path)


def from_tokenizer_dir(folder: str) -> SpecialTokens:
  """The special tokens of a tokenizer or BERT folder: its vocab.txt, else its tokenizer.json.

  Raises:
    FileNotFoundError: the folder has neither file.
    ValueError: the vocabulary lacks one of the tokens.
  """
  vocab, tokenizer = (os.path.join(folder, name) for name in VOCAB_FILES)
  if os.path.isfile(vocab):
    return from_vocab(vocab)
  if os.path.isfile(tokenizer):
    return from_tokenizer_json(tokenizer)
  raise FileNotFoundError(f'{folder!r} holds no tokenizer ({" or ".join(VOCAB_FILES)})')
