"""Predict a file of examples with a trained run; one CSV row per example.

  python -m cider_jax.predict WORKDIR --input FILE --output OUT.csv [--split test]
      [--on_bad_rows stop|skip] [--tau T]

FILE is either
  - an MMSA pickle (.pkl / .pickle / .joblib, read through the safe unpickler): a dict of
    splits (`--split` picks one) or one split's dict, with `text_bert` (N, 3, L) token ids of
    the run's tokenizer (or `raw_text`, tokenised here), `audio` (N, La, Da), `vision`
    (N, Lv, Dv), optional `audio_lengths` / `vision_lengths` (else the text lengths, as in
    aligned files), `id` and `raw_text`;
  - a CSV (.csv) with a header and the columns `text`, `audio`, `vision` (paths of .npy files
    holding one example's (frames, Da) / (frames, Dv) features, relative to the CSV's folder)
    and optionally `id`.
OUT.csv has the columns id, text, factual_<class>…, debiased_<class>… (probabilities; debiased
= softmax(y − τ·y_cf) with the run's τ chosen on validation), label (the debiased argmax) and
label_factual. A bad row (feature width, no frames, NaN, empty text, unreadable .npy) is
reported with its row: `--on_bad_rows stop` (default) writes nothing and exits 1, `skip`
leaves it out of OUT.csv.

Importing this module also gives `cider_jax.predict(...)`, the one-call function of
cider_jax.inference: the module itself is callable, so `cider_jax.predict` works whether it
names the function or, once this command's module is imported, the module.
"""
import argparse
import csv
import os
import sys
import types

MAX_LISTED = 20        # bad rows printed one by one; the rest are counted
PICKLE_SUFFIXES = ('.pkl', '.pickle', '.joblib')


def predict(*args, **kwargs):
  """cider_jax.inference.predict: class probabilities for new samples in one call."""
  from cider_jax import inference  # pylint: disable=g-import-not-at-top
  return inference.predict(*args, **kwargs)


class InputError(ValueError):
  """A problem with the whole input file (not one row)."""


class Examples:
  """The examples of an input file: ids, texts, and what `Predictor.prepare` takes."""

  def __init__(self, ids, texts, prepare_args, where, bad=()):
    self.ids = list(ids)
    self.texts = list(texts)
    self.prepare_args = prepare_args   # keyword arguments of Predictor.prepare
    self.where = where                 # row index -> 'line 3' / 'test example 3'
    self.bad = list(bad)               # BadRows found while reading (unreadable .npy files)


# ------------------------------------------------------------------------------ readers

def read_pickle_input(path: str, split: str, predictor) -> Examples:
  """An MMSA pickle's split (see the module docstring)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cider_jax.data import mmsa  # pylint: disable=g-import-not-at-top
  data = mmsa.read_pickle(path, 'input file')
  if not isinstance(data, dict):
    raise InputError(f'{path}: expected a dict of splits or one split, got {type(data).__name__}')
  if 'audio' not in data:
    if split not in data:
      raise InputError(f'{path}: no split {split!r} (found {sorted(map(str, data))}); choose '
                       'one with --split')
    data = data[split]
    label = f'{split} example'
  else:
    label = 'example'
  for key in ('audio', 'vision'):
    if key not in data:
      raise InputError(f'{path}: field {key!r} missing (split {split!r})')
  if 'text_bert' not in data and 'raw_text' not in data:
    raise InputError(f'{path}: neither text_bert (token ids) nor raw_text (split {split!r})')
  try:
    audio, vision = (np.asarray(data[k], np.float32) for k in ('audio', 'vision'))
  except (TypeError, ValueError) as e:
    raise InputError(f'{path}: audio / vision are not numeric arrays ({e})') from None
  audio = np.where(np.isneginf(audio), 0.0, audio)   # as the MMSA reader: -inf frames are 0
  n = len(audio)
  args = {'audio': audio, 'vision': vision}
  if 'text_bert' in data:
    args['text_bert'] = np.asarray(data['text_bert'])
    if args['text_bert'].ndim != 3 or args['text_bert'].shape[1] != 3:
      raise InputError(f'{path}: text_bert has shape {args["text_bert"].shape}; expected '
                       '(N, 3, L) token ids / attention mask / segment ids')
    text_len = args['text_bert'][:, 1].sum(axis=1).astype(np.int64)
  else:
    args['texts'] = [str(t) for t in data['raw_text']]
    text_len = None
  for m in ('audio', 'vision'):
    lengths = data.get(f'{m}_lengths', text_len)
    args[f'{m}_lengths'] = None if lengths is None else np.asarray(lengths).astype(np.int64)
  for k, v in args.items():
    if v is not None and len(v) != n:
      raise InputError(f'{path}: field {k} has {len(v)} examples, audio has {n}')
  ids = [str(i) for i in data['id']] if 'id' in data else [str(i) for i in range(n)]
  if 'raw_text' in data:
    texts = [str(t) for t in data['raw_text']]
  else:
    tok = predictor.tokenizer
    texts = [tok.decode(row[row > 0].astype(int).tolist(), skip_special_tokens=True)
             for row in args['text_bert'][:, 0]]
  return Examples(ids, texts, args, lambda i: f'{label} {i} (id {ids[i]})')


def read_csv_input(path: str, predictor) -> Examples:
  """A CSV of texts with one .npy file per example and modality (see the module docstring)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cider_jax.inference import BadRow  # pylint: disable=g-import-not-at-top
  folder = os.path.dirname(os.path.abspath(path))
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.DictReader(f)
    rows = list(reader)
    fields = set(reader.fieldnames or ())
  missing = [c for c in ('text', 'audio', 'vision') if c not in fields]
  if missing:
    raise InputError(f'{path}: column(s) {", ".join(missing)} missing; expected a header '
                     'with text, audio, vision (paths of .npy files) and optionally id')
  Da, Dv = predictor.spec.feature_dims
  feats, bad = {'audio': [], 'vision': []}, []
  for i, row in enumerate(rows):
    for m, D in (('audio', Da), ('vision', Dv)):
      name = (row[m] or '').strip()
      file = os.path.join(folder, name)
      try:
        if not name:
          raise OSError('no file named')
        feats[m].append(np.load(file, allow_pickle=False))
      except (OSError, ValueError) as e:
        bad.append(BadRow(i, m, f'cannot read {name or "(empty)"}: '
                                f'{" ".join(str(e).split())[:120]}'))
        feats[m].append(np.zeros((1, D), np.float32))   # a placeholder; the row is bad
  ids = [(row.get('id') or str(i)) for i, row in enumerate(rows)]
  texts = [row['text'] or '' for row in rows]
  return Examples(ids, texts, {'texts': texts, **feats}, lambda i: f'line {i + 2} (id {ids[i]})',
                  bad)


# ------------------------------------------------------------------------------ command

def predict_file(predictor, input_path: str, output_path: str, split: str = 'test',
                 on_bad_rows: str = 'stop', tau=None, log=sys.stderr) -> dict:
  """Predicts every good example of `input_path` into `output_path` (CSV).

  Returns {'written': rows written, 'bad': [(where, problem)]}. Raises InputError for a problem
  with the whole file and, under on_bad_rows='stop', for bad rows (listed on `log` first).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  if input_path.lower().endswith('.csv'):
    ex = read_csv_input(input_path, predictor)
  else:
    ex = read_pickle_input(input_path, split, predictor)
  inputs, bad = predictor.prepare(**ex.prepare_args)
  bad = sorted(set(bad) | set(ex.bad))
  problems = [(ex.where(b.row), f'{b.field}: {b.problem}') for b in bad]
  for where, problem in problems[:MAX_LISTED]:
    print(f'{input_path}: {where}: {problem}', file=log)
  if len(problems) > MAX_LISTED:
    print(f'{input_path}: … and {len(problems) - MAX_LISTED} more bad rows', file=log)
  if problems and on_bad_rows == 'stop':
    raise InputError(f'{input_path}: {len({b.row for b in bad})} bad row(s) of '
                     f'{len(ex.ids)} (listed above); fix them, or pass --on_bad_rows=skip to '
                     'leave them out')
  keep = np.setdiff1d(np.arange(len(ex.ids)), [b.row for b in bad])
  out = predictor.predict_inputs({k: v[keep] for k, v in inputs.items()}, tau=tau,
                                 progress=len(keep) > max(predictor.buckets))
  names = predictor.class_names
  with open(output_path, 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(['id', 'text'] + [f'factual_{c}' for c in names] +
               [f'debiased_{c}' for c in names] + ['label', 'label_factual'])
    for j, i in enumerate(keep):
      w.writerow([ex.ids[i], ex.texts[i]] + [f'{p:.6f}' for p in out['probs'][j]] +
                 [f'{p:.6f}' for p in out['probs_debiased'][j]] +
                 [names[out['labels'][j]], names[out['labels_factual'][j]]])
  return {'written': len(keep), 'bad': problems, 'tau': out['tau']}


def _parser() -> argparse.ArgumentParser:
  doc = __doc__.split('\n\n')
  parser = argparse.ArgumentParser(
      prog='python -m cider_jax.predict', description=doc[0], epilog=doc[2],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('workdir', help='a training run (checkpoints/best, constants.npz)')
  parser.add_argument('--input', required=True, metavar='FILE',
                      help='an MMSA pickle (.pkl/.pickle/.joblib) or a CSV (.csv) of texts with '
                      '.npy feature files (see below)')
  parser.add_argument('--output', required=True, metavar='OUT.csv', help='the predictions')
  parser.add_argument('--split', default='test', choices=('train', 'valid', 'test'),
                      help='the split of an MMSA pickle of several splits (default: test)')
  parser.add_argument('--on_bad_rows', default='stop', choices=('stop', 'skip'),
                      help='stop: report every bad row and write nothing (default); skip: '
                      'report them and predict the others')
  parser.add_argument('--tau', type=float, default=None,
                      help='counterfactual strength (default: the run\'s, chosen on validation)')
  return parser


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  name = args.input.lower()
  if not os.path.isfile(args.input):
    print(f'error: --input {args.input}: no such file', file=sys.stderr)
    return 1
  if not (name.endswith('.csv') or name.endswith(PICKLE_SUFFIXES)):
    print(f'error: --input {args.input}: expected an MMSA pickle ({", ".join(PICKLE_SUFFIXES)}) '
          'or a .csv', file=sys.stderr)
    return 1
  out_dir = os.path.dirname(os.path.abspath(args.output))
  if not os.path.isdir(out_dir):
    print(f'error: --output {args.output}: folder {out_dir} does not exist', file=sys.stderr)
    return 1
  from cider_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from cider_jax import evaluate, inference  # pylint: disable=g-import-not-at-top
  from cider_jax.data.validate import DataError  # pylint: disable=g-import-not-at-top
  try:
    predictor = inference.Predictor(args.workdir, tau=args.tau)
    print(f'{args.workdir}: τ = {predictor.tau:g} ({predictor.tau_source}), classes '
          f'{", ".join(predictor.class_names)}', file=sys.stderr)
    result = predict_file(predictor, args.input, args.output, args.split, args.on_bad_rows)
  except (InputError, DataError, evaluate.EvaluationError, ckpt_lib.CheckpointError,
          FileNotFoundError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 1
  skipped = f'; skipped {len(result["bad"])} bad row(s) (listed above)' if result['bad'] else ''
  print(f'wrote {result["written"]} rows to {args.output}{skipped}', file=sys.stderr)
  return 0


class _CallableModule(types.ModuleType):
  """This module, callable as the function `predict` (see the module docstring)."""

  def __call__(self, *args, **kwargs):
    return predict(*args, **kwargs)


if __name__ == '__main__':
  raise SystemExit(main())
sys.modules[__name__].__class__ = _CallableModule
