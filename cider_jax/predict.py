"""Predict a file of examples with a trained run; one CSV row per example.

  python -m cider_jax.predict WORKDIR --input FILE --output OUT.csv [--split test]
      [--on_bad_rows stop|skip] [--tau T] [--allow_any_path]

FILE is either
  - an MMSA pickle (.pkl / .pickle / .joblib, read through the safe unpickler): a dict of
    splits (`--split` picks one) or one split's dict, with `text_bert` (N, 3, L) token ids of
    the run's tokenizer (or `raw_text`, tokenised here), `audio` (N, La, Da), `vision`
    (N, Lv, Dv), optional `audio_lengths` / `vision_lengths` (else the text lengths, as in
    aligned files), `id` and `raw_text`;
  - a CSV (.csv, UTF-8 with or without a byte-order mark) with a header and the columns
    `text`, `audio`, `vision` (paths of .npy files holding one example's (frames, Da) /
    (frames, Dv) float or integer features) and optionally `id`. A feature path is relative
    to the CSV's folder and must name a regular file inside that folder, links resolved: an
    absolute path, or one that leads out of the folder (`..`, a link pointing out), makes a
    bad row unless --allow_any_path is given. A folder, FIFO or device is never read, with
    or without it.
OUT.csv has the columns id, text, factual_<class>…, debiased_<class>… (probabilities; debiased
= softmax(y − τ·y_cf) with the run's τ chosen on validation, empty for a run without MACI),
label (the debiased argmax), label_factual and text_truncated (1: the text was longer than the
run's L tokens and only its first L were used; the console gives the count). It is written
whole once every row is computed, or not at all, and may not be the input file. A bad row
(feature width, no frames, NaN, empty text, a feature file that is missing, refused or not a
readable .npy) is reported with its row: `--on_bad_rows stop` (default) writes nothing and
exits 1, `skip` leaves it out of OUT.csv. Every other problem with the input, the output path
or --tau is one `error:` line and exit 1, found before the model is loaded where it can be.

Importing this module also gives `cider_jax.predict(...)`, the one-call function of
cider_jax.inference: the module itself is callable, so `cider_jax.predict` works whether it
names the function or, once this command's module is imported, the module.
"""
import argparse
import codecs
import csv
import io
import math
import os
import stat
import sys
import tempfile
import types

MAX_LISTED = 20        # bad rows printed one by one; the rest are counted
PICKLE_SUFFIXES = ('.pkl', '.pickle', '.joblib')
FEATURE_KINDS = 'fiu'  # numpy dtype kinds a feature file may hold: float, integer, unsigned


def predict(*args, **kwargs):
  """cider_jax.inference.predict: class probabilities for new samples in one call."""
  from cider_jax import inference  # pylint: disable=g-import-not-at-top
  return inference.predict(*args, **kwargs)


class InputError(ValueError):
  """A problem with the whole input file, the output path or an option (not one row)."""


class Examples:
  """The examples of an input file: ids, texts, and what `Predictor.prepare` takes."""

  def __init__(self, ids, texts, prepare_args, where, bad=(), files=()):
    self.ids = list(ids)
    self.texts = None if texts is None else list(texts)   # None: decoded from text_bert
    self.prepare_args = prepare_args   # keyword arguments of Predictor.prepare; a feature
                                       # file not read is None (its row is in `bad`)
    self.where = where                 # row index -> 'line 3' / 'test example 3'
    self.bad = list(bad)               # BadRows found while reading (feature files)
    self.files = set(files)            # the real paths of the feature files read


# ------------------------------------------------------------------------------ paths

def _kind_of_file(mode: int) -> str:
  """What a non-regular file is, in words."""
  for test, word in ((stat.S_ISDIR, 'a folder'), (stat.S_ISFIFO, 'a FIFO (named pipe)'),
                     (stat.S_ISCHR, 'a character device'), (stat.S_ISBLK, 'a block device'),
                     (stat.S_ISSOCK, 'a socket')):
    if test(mode):
      return word
  return 'not a regular file'


def check_output(output_path: str, input_path: str) -> None:
  """Raises InputError unless OUT.csv can be written at `output_path`: not the input file
  (links resolved), not a folder or other non-regular file, in an existing folder where a new
  file can be made (OUT.csv is written as a temporary file there, then renamed)."""
  out = os.path.abspath(output_path)
  same = os.path.realpath(out) == os.path.realpath(input_path)
  if not same and os.path.exists(out) and os.path.exists(input_path):
    same = os.path.samefile(out, input_path)
  if same:
    raise InputError(f'--output {output_path} is the input file {input_path}; name another '
                     'file for the predictions')
  if os.path.isdir(out):
    raise InputError(f'--output {output_path} is a folder; name a file in it, e.g. '
                     f'{os.path.join(output_path, "predictions.csv")}')
  folder = os.path.dirname(out)
  if not os.path.isdir(folder):
    what = 'is not a folder' if os.path.exists(folder) else 'does not exist'
    raise InputError(f'--output {output_path}: {folder} {what}; create the folder or name '
                     'another one')
  if os.path.exists(out):
    mode = os.stat(out).st_mode
    if not stat.S_ISREG(mode):
      raise InputError(f'--output {output_path} is {_kind_of_file(mode)}; name a file')
    if not os.access(out, os.W_OK):
      raise InputError(f'--output {output_path} is read-only; name another file or make it '
                       'writable')
  try:
    fd, probe = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(out)}.',
                                 suffix='.tmp')
  except OSError as e:
    raise InputError(f'--output {output_path}: cannot create a file in {folder} '
                     f'({e.strerror or e}); name a file in a writable folder') from None
  os.close(fd)
  os.unlink(probe)


def check_not_read(output_path: str, ex: Examples, input_path: str) -> None:
  """Raises InputError if `output_path` is one of the feature files the input names."""
  if os.path.realpath(output_path) in ex.files:
    raise InputError(f'--output {output_path} is one of the feature files of {input_path}; '
                     'name another file for the predictions')


def feature_file(folder: str, name: str, allow_any_path: bool = False) -> str:
  """The path of a CSV row's feature file `name` (relative to the CSV's `folder`). Raises
  ValueError (the row's problem) unless it is a regular file inside `folder`, links resolved
  (anywhere under allow_any_path), and OSError when it cannot be examined (missing, say)."""
  if os.path.isabs(name) and not allow_any_path:
    raise ValueError("an absolute path: name the file relative to the CSV's folder, or pass "
                     '--allow_any_path')
  path = os.path.join(folder, name)
  if not allow_any_path:
    home, real = os.path.realpath(folder), os.path.realpath(path)
    if os.path.commonpath([home, real]) != home:
      raise ValueError(f"leads out of the CSV's folder {home} (to {real}): move the file into "
                       'it, or pass --allow_any_path')
  mode = os.stat(path).st_mode         # never opened unless a regular file (a FIFO would block)
  if not stat.S_ISREG(mode):
    raise ValueError(f'{_kind_of_file(mode)}, not an .npy file')
  return path


def read_npy(path: str):
  """The (frames, D) features of the .npy file at `path` as float32. The header is checked
  against the file's size before any data is read (a damaged header allocates nothing);
  ValueError for an empty file, a damaged or truncated one, or a dtype that is not float or
  integer (complex, bool, strings, objects: never unpickled)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from numpy.lib import format as npy_format  # pylint: disable=g-import-not-at-top
  # O_NONBLOCK: a FIFO put in the file's place since it was examined is not waited on
  fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) | getattr(os, 'O_BINARY', 0))
  with os.fdopen(fd, 'rb') as f:
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode):
      raise ValueError(f'{_kind_of_file(st.st_mode)}, not an .npy file')
    if st.st_size == 0:
      raise ValueError('an empty file (0 bytes), not an .npy file')
    try:
      version = npy_format.read_magic(f)
      if version == (1, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_2_0(f)
      else:
        raise ValueError(f'format version {version[0]}.{version[1]}; expected 1.0 or 2.0')
    except ValueError as e:
      raise ValueError(f'not a readable .npy file ({" ".join(str(e).split())[:120]})') from None
    if dtype.hasobject or dtype.kind not in FEATURE_KINDS:
      raise ValueError(f'holds {dtype} values; expected float or integer features')
    count = math.prod(shape)
    need, have = count * dtype.itemsize, st.st_size - f.tell()
    if need > have:
      raise ValueError(f'the header declares shape {shape} of {dtype} ({need} bytes) but the '
                       f'file holds {have} bytes of data: a truncated or damaged file')
    data = f.read(need)
  if len(data) != need:
    raise ValueError(f'{len(data)} bytes of data where the header declares {need}')
  a = np.frombuffer(data, dtype, count=count).reshape(shape, order='F' if fortran_order else 'C')
  return a.astype(np.float32)


# ------------------------------------------------------------------------------ readers

def _strings(path: str, data: dict, key: str, n: int) -> list:
  """A pickle's field of n strings (ids, raw texts); InputError if it is not."""
  try:
    values = [str(v) for v in data[key]]
  except TypeError:
    raise InputError(f'{path}: field {key!r} is {type(data[key]).__name__}, not a list of '
                     f'{n} entries') from None
  if len(values) != n:
    raise InputError(f'{path}: field {key!r} has {len(values)} entries, audio has {n} '
                     'examples; give one per example')
  return values


def read_pickle_input(path: str, split: str) -> Examples:
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
    if not isinstance(data, dict):
      raise InputError(f'{path}: split {split!r} is {type(data).__name__}, expected a dict')
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
  for key, x in (('audio', audio), ('vision', vision)):
    if x.ndim != 3:
      raise InputError(f'{path}: {key} has shape {x.shape}; expected (N, frames, features)')
  audio = np.where(np.isneginf(audio), 0.0, audio)   # as the MMSA reader: -inf frames are 0
  n = len(audio)
  args = {'audio': audio, 'vision': vision}
  raw_text = _strings(path, data, 'raw_text', n) if 'raw_text' in data else None
  ids = _strings(path, data, 'id', n) if 'id' in data else [str(i) for i in range(n)]
  try:
    if 'text_bert' in data:
      args['text_bert'] = np.asarray(data['text_bert'], np.float64)
      if args['text_bert'].ndim != 3 or args['text_bert'].shape[1] != 3:
        raise InputError(f'{path}: text_bert has shape {args["text_bert"].shape}; expected '
                         '(N, 3, L) token ids / attention mask / segment ids')
      text_len = args['text_bert'][:, 1].sum(axis=1).astype(np.int64)
    else:
      args['texts'] = raw_text
      text_len = None
    for m in ('audio', 'vision'):
      lengths = data.get(f'{m}_lengths', text_len)
      args[f'{m}_lengths'] = None if lengths is None else np.asarray(lengths).astype(np.int64)
  except (TypeError, ValueError) as e:
    if isinstance(e, InputError):
      raise
    raise InputError(f'{path}: text_bert or the lengths are not numeric arrays '
                     f'({" ".join(str(e).split())[:120]})') from None
  for k, v in args.items():
    if v is not None and len(v) != n:
      raise InputError(f'{path}: field {k} has {len(v)} examples, audio has {n}')
  return Examples(ids, raw_text, args, lambda i: f'{label} {i} (id {ids[i]})')


def _csv_text(path: str) -> str:
  """The CSV's text: UTF-8, a leading byte-order mark dropped; InputError naming the line of
  the first byte that is not UTF-8."""
  with open(path, 'rb') as f:
    data = f.read()
  if data.startswith(codecs.BOM_UTF8):
    data = data[len(codecs.BOM_UTF8):]
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    line = data.count(b'\n', 0, e.start) + 1
    raise InputError(f'{path}: line {line}: byte 0x{data[e.start]:02X} is not UTF-8; save the '
                     'file as UTF-8 (spreadsheets: "CSV UTF-8")') from None


def read_csv_input(path: str, allow_any_path: bool = False) -> Examples:
  """A CSV of texts with one .npy file per example and modality (see the module docstring).
  Feature files that are refused or unreadable make bad rows (Examples.bad)."""
  from cider_jax.inference import BadRow  # pylint: disable=g-import-not-at-top
  folder = os.path.dirname(os.path.abspath(path))
  reader = csv.reader(io.StringIO(_csv_text(path), newline=''))
  rows, lines = [], []       # lines: the line each row starts on
  try:
    header = [h.strip() for h in next(reader, None) or ()]
    while True:
      start = reader.line_num + 1
      record = next(reader, None)
      if record is None:
        break
      if record:                                  # a blank line is no row
        rows.append(dict(zip(header, record)))
        lines.append(start)
  except csv.Error as e:
    raise InputError(f'{path}: line {reader.line_num}: not a readable CSV row ({e}); save it '
                     'as a CSV with a header') from None
  missing = [c for c in ('text', 'audio', 'vision') if c not in header]
  if missing:
    raise InputError(f'{path}: column(s) {", ".join(missing)} missing; expected a header '
                     'with text, audio, vision (paths of .npy files) and optionally id')
  feats, bad, files = {'audio': [], 'vision': []}, [], set()
  for i, row in enumerate(rows):
    for m in ('audio', 'vision'):
      name = (row.get(m) or '').strip()
      x = None
      try:
        if not name:
          raise ValueError('no file named')
        file = feature_file(folder, name, allow_any_path)
        files.add(os.path.realpath(file))
        x = read_npy(file)
      except ValueError as e:
        bad.append(BadRow(i, m, str(e) if not name else f'{name}: {e}'))
      except OSError as e:
        bad.append(BadRow(i, m, f'cannot read {name}: {e.strerror or e}'))
      feats[m].append(x)
  ids = [(row.get('id') or str(i)) for i, row in enumerate(rows)]
  texts = [row.get('text') or '' for row in rows]
  return Examples(ids, texts, {'texts': texts, **feats},
                  lambda i: f'line {lines[i]} (id {ids[i]})', bad, files)


def read_input(path: str, split: str = 'test', allow_any_path: bool = False) -> Examples:
  """The examples of an input file, a CSV or an MMSA pickle (by its suffix); no model needed."""
  if os.path.exists(path) and not os.path.isfile(path):
    raise InputError(f'{path} is {_kind_of_file(os.stat(path).st_mode)}; expected a file')
  if path.lower().endswith('.csv'):
    return read_csv_input(path, allow_any_path)
  return read_pickle_input(path, split)


# ------------------------------------------------------------------------------ command

def _bad_rows(input_path: str, ex: Examples, bad, on_bad_rows: str, log) -> list:
  """[(where, problem)] of the bad rows, listed on `log`; InputError, naming the first, under
  on_bad_rows='stop'."""
  problems = [(ex.where(b.row), f'{b.field}: {b.problem}') for b in bad]
  for where, problem in problems[:MAX_LISTED]:
    print(f'{input_path}: {where}: {problem}', file=log)
  if len(problems) > MAX_LISTED:
    print(f'{input_path}: … and {len(problems) - MAX_LISTED} more bad rows', file=log)
  if problems and on_bad_rows == 'stop':
    where, problem = problems[0]
    raise InputError(f'{input_path}: {len({b.row for b in bad})} bad row(s) of '
                     f'{len(ex.ids)} (the first: {where}: {problem}; all listed above); fix '
                     'them, or pass --on_bad_rows=skip to leave them out')
  return problems


def predict_file(predictor, input_path: str, output_path: str, split: str = 'test',
                 on_bad_rows: str = 'stop', tau=None, log=sys.stderr,
                 allow_any_path: bool = False, examples=None) -> dict:
  """Predicts every good example of `input_path` into `output_path` (CSV), written whole once
  every row is computed (nothing is written otherwise). `examples`: the file as `read_input`
  read it (read here when None).

  Returns {'written': rows written, 'bad': [(where, problem)], 'tau', 'truncated': rows
  written whose text was cut}. Raises InputError for a problem with the whole file or the
  output path and, under on_bad_rows='stop', for bad rows (listed on `log` first).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cider_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  check_output(output_path, input_path)
  ex = read_input(input_path, split, allow_any_path) if examples is None else examples
  check_not_read(output_path, ex, input_path)
  args = dict(ex.prepare_args)
  for m, D in zip(('audio', 'vision'), predictor.spec.feature_dims):
    if isinstance(args.get(m), list):   # a placeholder for a feature file not read (a bad row)
      args[m] = [np.zeros((1, D), np.float32) if x is None else x for x in args[m]]
  inputs, bad = predictor.prepare(**args)
  bad = sorted(set(bad) | set(ex.bad))
  problems = _bad_rows(input_path, ex, bad, on_bad_rows, log)
  keep = np.setdiff1d(np.arange(len(ex.ids)), [b.row for b in bad])
  out = predictor.predict_inputs({k: v[keep] for k, v in inputs.items()}, tau=tau,
                                 progress=len(keep) > max(predictor.buckets))
  texts = ex.texts
  if texts is None:
    tok = predictor.tokenizer
    texts = [tok.decode(row[row > 0].astype(int).tolist(), skip_special_tokens=True)
             for row in args['text_bert'][:, 0]]
  names = predictor.class_names
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(['id', 'text'] + [f'factual_{c}' for c in names] +
             [f'debiased_{c}' for c in names] + ['label', 'label_factual', 'text_truncated'])
  debiased = out['probs_debiased']     # None: a run without MACI, no debiased prediction
  for j, i in enumerate(keep):
    w.writerow([ex.ids[i], texts[i]] + [f'{p:.6f}' for p in out['probs'][j]] +
               ([''] * len(names) if debiased is None else [f'{p:.6f}' for p in debiased[j]]) +
               [names[out['labels'][j]], names[out['labels_factual'][j]],
                int(out['text_truncated'][j])])
  try:
    ckpt_lib.write_text(output_path, buf.getvalue())
  except OSError as e:
    raise InputError(f'--output {output_path}: cannot write ({e.strerror or e}); nothing was '
                     'written') from None
  truncated = int(np.sum(out['text_truncated']))
  if truncated:
    L = predictor.spec.seq_lens[0]
    print(f"note: {truncated} of {len(keep)} texts were longer than the model's {L} tokens and "
          f'were cut to {L} (column text_truncated of {output_path})', file=log)
  return {'written': len(keep), 'bad': problems, 'tau': out['tau'], 'truncated': truncated}


def _parser() -> argparse.ArgumentParser:
  doc = __doc__.split('\n\n')
  parser = argparse.ArgumentParser(
      prog='python -m cider_jax.predict', description=doc[0], epilog=doc[2],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('workdir', help='a training run (checkpoints/best, constants.npz)')
  parser.add_argument('--input', required=True, metavar='FILE',
                      help='an MMSA pickle (.pkl/.pickle/.joblib) or a CSV (.csv) of texts with '
                      '.npy feature files (see below)')
  parser.add_argument('--output', required=True, metavar='OUT.csv',
                      help='the predictions: a new or replaced file, not the input; written '
                      'whole or not at all')
  parser.add_argument('--split', default='test', choices=('train', 'valid', 'test'),
                      help='the split of an MMSA pickle of several splits (default: test)')
  parser.add_argument('--on_bad_rows', default='stop', choices=('stop', 'skip'),
                      help='stop: report every bad row and write nothing (default); skip: '
                      'report them and predict the others')
  parser.add_argument('--tau', type=float, default=None,
                      help='counterfactual strength, a finite number >= 0 (default: the '
                      'run\'s, chosen on validation)')
  parser.add_argument('--allow_any_path', action='store_true',
                      help='a CSV may name feature files anywhere: absolute paths and paths or '
                      'links leading out of its folder (default: only files inside the CSV\'s '
                      'folder); a folder, FIFO or device is still refused')
  return parser


def _check_arguments(args) -> None:
  """InputError for a --tau, --input or --output that cannot be used (nothing read yet)."""
  from cider_jax import inference  # pylint: disable=g-import-not-at-top
  if args.tau is not None:
    try:
      inference.check_tau(args.tau)
    except ValueError as e:
      raise InputError(f'--{e}') from None
  if not os.path.exists(args.input):
    raise InputError(f'--input {args.input}: no such file')
  if not os.path.isfile(args.input):
    raise InputError(f'--input {args.input} is {_kind_of_file(os.stat(args.input).st_mode)}; '
                     'expected a file')
  if not args.input.lower().endswith(('.csv',) + PICKLE_SUFFIXES):
    raise InputError(f'--input {args.input}: expected an MMSA pickle '
                     f'({", ".join(PICKLE_SUFFIXES)}) or a .csv')
  check_output(args.output, args.input)


def _error(e) -> int:
  print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
  return 1


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  from cider_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from cider_jax import evaluate, inference  # pylint: disable=g-import-not-at-top
  from cider_jax.data.validate import DataError  # pylint: disable=g-import-not-at-top
  try:                      # what needs no model, before it is loaded
    _check_arguments(args)
    ex = read_input(args.input, args.split, args.allow_any_path)
    check_not_read(args.output, ex, args.input)
    if ex.bad and args.on_bad_rows == 'stop':
      _bad_rows(args.input, ex, ex.bad, 'stop', sys.stderr)
  except (InputError, DataError) as e:
    return _error(e)
  try:
    predictor = inference.Predictor(args.workdir, tau=args.tau)
    print(f'{args.workdir}: τ = {predictor.tau:g} ({predictor.tau_source}), classes '
          f'{", ".join(predictor.class_names)}', file=sys.stderr)
    result = predict_file(predictor, args.input, args.output, args.split, args.on_bad_rows,
                          allow_any_path=args.allow_any_path, examples=ex)
  except (InputError, DataError, evaluate.EvaluationError, ckpt_lib.CheckpointError,
          FileNotFoundError) as e:
    return _error(e)
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
