"""`python -m cider_jax.predict` and the Predictor on bad input: every problem a user causes is
one `error:` line and exit 1 (no traceback), the input files unchanged and no OUT.csv (nor a
temporary file) left; what needs no model is refused before the model is loaded.

The command runs in this process (`main`, stderr captured). Checks that must come before the
model pass a workdir that does not exist: reaching the model would name the workdir instead.
"""
import csv
import importlib
import math
import os
import pickle
import signal

import numpy as np
import pytest
from numpy.lib import format as npy_format

from cider_jax import inference
from tests.helpers import runs

cli = importlib.import_module('cider_jax.predict')
NO_MODEL = '/nonexistent/workdir'    # a run that is never reached


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A workdir with a (randomly initialised) best checkpoint, its Predictor (buckets 1 and 8)
  and the feature widths (Da, Dv)."""
  tmp = tmp_path_factory.mktemp('predict_inputs')
  config = runs.small_config(tmp, modes=('RMFM',), rates=(0.0,), eval_batch_size=40)
  workdir = str(tmp / 'run')
  runs.random_best_run(config, workdir)
  predictor = inference.Predictor(workdir, buckets=(1, 8))
  return {'workdir': workdir, 'predictor': predictor, 'dims': predictor.spec.feature_dims}


DIMS = (5, 20)   # the small run's (Da, Dv), for inputs made before the model is loaded


def _csv_input(folder, n=3, cells=None, texts=None, dims=DIMS, prefix=b''):
  """in.csv in `folder` with n rows (ids clip0…, good .npy features of widths `dims`); cells
  {(row, column): value} replaces CSV cells; `prefix` goes before the header's bytes."""
  rng = np.random.RandomState(0)
  rows = []
  for i in range(n):
    row = {'id': f'clip{i}', 'text': (texts or ['a fine film'] * n)[i]}
    for m, D in zip(('audio', 'vision'), dims):
      np.save(folder / f'{m}{i}.npy', rng.randn(4 + i, D).astype(np.float32))
      row[m] = f'{m}{i}.npy'
    for (r, column), value in (cells or {}).items():
      if r == i:
        row[column] = value
    rows.append(row)
  path = folder / 'in.csv'
  with open(path, 'w', newline='', encoding='utf-8') as f:
    w = csv.DictWriter(f, fieldnames=['id', 'text', 'audio', 'vision'])
    w.writeheader()
    w.writerows(rows)
  path.write_bytes(prefix + path.read_bytes())
  return path


def _snapshot(folder):
  """{name: bytes} of the plain files directly in `folder`."""
  return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


def _refused(capsys, argv, folder, *names):
  """Runs the command; asserts exit 1, one `error:` line naming each of `names`, no traceback,
  `folder`'s files unchanged and none added (no OUT.csv, no temporary file). The error line."""
  before, names_before = _snapshot(folder), sorted(os.listdir(folder))
  capsys.readouterr()
  rc = cli.main([str(a) for a in argv])
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith('error:')]
  assert rc == 1, err
  assert len(errors) == 1, err
  assert 'Traceback' not in err
  for name in names:
    assert str(name) in errors[0], err
  assert _snapshot(folder) == before
  assert sorted(os.listdir(folder)) == names_before
  return errors[0]


# ------------------------------------------------------------------------------ 1. output = input

@pytest.mark.parametrize('how', ['same', 'relative', 'symlink', 'hardlink', 'feature_file'])
def test_output_may_not_be_the_input(capsys, tmp_path, monkeypatch, how):
  """Not the input file, however named, nor one of the feature files it names."""
  src = _csv_input(tmp_path)
  if how == 'same':
    out = src
  elif how == 'relative':
    (tmp_path / 'sub').mkdir()
    monkeypatch.chdir(tmp_path / 'sub')
    out = '../in.csv'
  elif how == 'symlink':
    out = tmp_path / 'link.csv'
    os.symlink(src, out)
  elif how == 'hardlink':
    out = tmp_path / 'hard.csv'
    os.link(src, out)
  else:
    out = tmp_path / 'audio0.npy'
  line = _refused(capsys, [NO_MODEL, '--input', src, '--output', out], tmp_path, '--output')
  assert ('is one of the feature files' if how == 'feature_file' else 'is the input file') in line


# ------------------------------------------------------------------------------ 2. output path

@pytest.mark.parametrize('kind', ['folder', 'no_folder', 'not_writable', 'fifo'])
def test_output_path_is_checked_before_the_model(capsys, tmp_path, kind):
  src = _csv_input(tmp_path)
  out, says = {'folder': (tmp_path, 'is a folder'),
               'no_folder': (tmp_path / 'missing' / 'out.csv', 'does not exist'),
               'not_writable': ('/proc/version', 'cannot create a file in /proc'
                                if os.geteuid() == 0 else 'read-only'),
               'fifo': (tmp_path / 'pipe.csv', 'FIFO')}[kind]
  if kind == 'fifo':
    os.mkfifo(out)
  line = _refused(capsys, [NO_MODEL, '--input', src, '--output', out], tmp_path, '--output', out)
  assert says in line


# ------------------------------------------------------------------------------ 3. whole or nothing

def test_short_raw_text_is_an_error_and_writes_nothing(capsys, tmp_path):
  """A pickle whose raw_text has fewer entries than examples: an error, not a traceback."""
  rng = np.random.RandomState(1)
  Da, Dv = DIMS
  split = {'audio': rng.randn(3, 6, Da), 'vision': rng.randn(3, 6, Dv),
           'raw_text': np.array(['one', 'two'], dtype=object)}
  src = tmp_path / 'in.pkl'
  with open(src, 'wb') as f:
    pickle.dump({'test': split}, f)
  line = _refused(capsys, [NO_MODEL, '--input', src, '--output', tmp_path / 'out.csv'],
                  tmp_path, src, 'raw_text')
  assert '2 entries' in line and '3 examples' in line


def test_a_failure_while_writing_rows_leaves_no_file(tmp_path, run, monkeypatch):
  """OUT.csv is made in memory and written whole: a failure computing a row leaves no file (nor
  a temporary one) and leaves a previous OUT.csv as it was."""
  p = run['predictor']
  src = _csv_input(tmp_path, dims=run['dims'])
  real = p.predict_inputs

  def short(*args, **kwargs):
    out = real(*args, **kwargs)
    return {**out, 'labels': out['labels'][:1]}      # a row without a label

  monkeypatch.setattr(p, 'predict_inputs', short)
  out = tmp_path / 'out.csv'
  before = _snapshot(tmp_path)
  with open(os.devnull, 'w') as log, pytest.raises(IndexError):
    cli.predict_file(p, str(src), str(out), log=log)
  assert _snapshot(tmp_path) == before
  out.write_text('previous\n')
  with open(os.devnull, 'w') as log, pytest.raises(IndexError):
    cli.predict_file(p, str(src), str(out), log=log)
  assert out.read_text() == 'previous\n'
  assert set(os.listdir(tmp_path)) == set(before) | {'out.csv'}


# ------------------------------------------------------------------------------ 4. τ

@pytest.mark.parametrize('tau', ['nan', 'inf', '-inf', '-1'])
def test_tau_must_be_finite_and_not_negative(capsys, tmp_path, run, tau):
  src = _csv_input(tmp_path)
  line = _refused(capsys, [NO_MODEL, '--input', src, '--output', tmp_path / 'out.csv',
                           f'--tau={tau}'], tmp_path, '--tau')
  assert 'finite' in line and '>= 0' in line
  with pytest.raises(ValueError, match='finite number >= 0'):
    inference.Predictor(run['workdir'], tau=float(tau))
  with pytest.raises(ValueError, match='finite number >= 0'):
    inference.predict(run['workdir'], ['a film'], [np.zeros((3, 5))], [np.zeros((3, 20))],
                      tau=float(tau))
  p = run['predictor']
  inputs, _ = p.prepare(['a film'], [np.ones((3, 5))], [np.ones((3, 20))])
  with pytest.raises(ValueError, match='finite number >= 0'):
    p.predict_inputs(inputs, tau=float(tau))
  with pytest.raises(ValueError, match='finite number >= 0'):
    p(['a film'], [np.ones((3, 5))], [np.ones((3, 20))], tau=float(tau))
  assert inference.check_tau(0) == 0.0 and inference.check_tau('1.5') == 1.5


# ------------------------------------------------------------------------------ 5. byte-order mark

def test_csv_with_a_byte_order_mark(tmp_path, run):
  """A spreadsheet's 'CSV UTF-8' starts with a byte-order mark: the id column is still read."""
  src = _csv_input(tmp_path, dims=run['dims'], prefix=b'\xef\xbb\xbf')
  assert cli.read_input(str(src)).ids == ['clip0', 'clip1', 'clip2']
  out = tmp_path / 'out.csv'
  with open(os.devnull, 'w') as log:
    result = cli.predict_file(run['predictor'], str(src), str(out), log=log)
  assert result['written'] == 3
  with open(out, newline='', encoding='utf-8') as f:
    assert [r['id'] for r in csv.DictReader(f)] == ['clip0', 'clip1', 'clip2']


# ------------------------------------------------------------------------------ 6. not UTF-8

def test_csv_that_is_not_utf8(capsys, tmp_path):
  src = _csv_input(tmp_path, texts=['fine', 'caf\u00e9 scene', 'fine'])
  src.write_bytes(src.read_bytes().replace('caf\u00e9'.encode('utf-8'), b'caf\xe9'))
  line = _refused(capsys, [NO_MODEL, '--input', src, '--output', tmp_path / 'out.csv'],
                  tmp_path, src, 'line 3', 'UTF-8')
  assert '0xE9' in line


# ------------------------------------------------------------------------------ 7. truncation

def test_texts_longer_than_the_model_are_counted(tmp_path, run):
  """The small run takes 12 tokens: the long texts are cut, counted on the console and marked
  in the text_truncated column (and in the Predictor's output)."""
  p = run['predictor']
  long = ' '.join(['wonderful'] * 30)
  src = _csv_input(tmp_path, n=4, texts=[long, 'short', long, 'also short'], dims=run['dims'])
  out, log = tmp_path / 'out.csv', tmp_path / 'log.txt'
  with open(log, 'w') as f:
    result = cli.predict_file(p, str(src), str(out), log=f)
  assert result['truncated'] == 2
  assert ("note: 2 of 4 texts were longer than the model's 12 tokens and were cut to 12"
          in log.read_text())
  with open(out, newline='', encoding='utf-8') as f:
    assert [r['text_truncated'] for r in csv.DictReader(f)] == ['1', '0', '1', '0']
  frames = [np.ones((3, 5)), np.ones((3, 5))], [np.ones((3, 20)), np.ones((3, 20))]
  np.testing.assert_array_equal(p([long, 'short'], *frames)['text_truncated'], [True, False])


# ------------------------------------------------------------------------------ 8. .npy files

def _bad_npy(path, kind):
  """A feature file that may not be read, of `kind`."""
  if kind == 'empty':
    path.write_bytes(b'')
  elif kind == 'not_npy':
    path.write_bytes(b'frame,feature\n1,2\n')
  elif kind == 'huge_header':      # declares 10**12 frames; holds 80 bytes
    with open(path, 'wb') as f:
      npy_format.write_array_header_1_0(
          f, {'descr': '<f4', 'fortran_order': False, 'shape': (10**12, 5)})
      f.write(b'\0' * 80)
  elif kind == 'cut_short':
    data = npy_format.header_data_from_array_1_0(np.zeros((4, 5), np.float32))
    with open(path, 'wb') as f:
      npy_format.write_array_header_1_0(f, data)
      f.write(b'\0' * 40)
  elif kind == 'object':
    np.save(path, np.array([[{'a': 1}]], dtype=object), allow_pickle=True)
  else:
    np.save(path, {'complex': np.ones((4, 5), np.complex64), 'bool': np.ones((4, 5), bool),
                   'string': np.full((4, 5), 'x')}[kind])


@pytest.mark.parametrize('kind', ['empty', 'not_npy', 'huge_header', 'cut_short', 'complex',
                                  'bool', 'object', 'string'])
def test_bad_feature_files_are_refused(capsys, tmp_path, kind):
  """Refused before any data is read, naming the file and the row (line 3)."""
  src = _csv_input(tmp_path)
  _bad_npy(tmp_path / 'audio1.npy', kind)
  line = _refused(capsys, [NO_MODEL, '--input', src, '--output', tmp_path / 'out.csv'],
                  tmp_path, src, 'line 3 (id clip1): audio: audio1.npy')
  said = {'empty': '0 bytes', 'not_npy': 'not a readable .npy', 'huge_header': 'truncated',
          'cut_short': 'truncated', 'complex': 'complex', 'bool': 'bool', 'object': 'object',
          'string': '<U1'}[kind]
  assert said in line


def test_integer_features_are_read_as_float32(tmp_path):
  np.save(tmp_path / 'a.npy', np.arange(10, dtype=np.int16).reshape(5, 2))
  np.save(tmp_path / 'f.npy', np.asfortranarray(np.arange(10, dtype=np.uint8).reshape(5, 2)))
  for name in ('a.npy', 'f.npy'):
    a = cli.read_npy(str(tmp_path / name))
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, np.arange(10).reshape(5, 2))


# ------------------------------------------------------------------------------ 9. paths

def _outside_path(tmp_path, kind):
  """The CSV cell naming a feature file of `kind`, made in or beside tmp_path/data."""
  data, outside = tmp_path / 'data', tmp_path / 'outside'
  outside.mkdir(exist_ok=True)
  np.save(outside / 'x.npy', np.ones((4, 5), np.float32))
  if kind == 'absolute':
    return str(outside / 'x.npy')
  if kind == 'dotdot':
    return '../outside/x.npy'
  if kind == 'symlink':
    os.symlink(outside / 'x.npy', data / 'link.npy')
    return 'link.npy'
  if kind == 'fifo':
    os.mkfifo(data / 'pipe.npy')
    return 'pipe.npy'
  (data / 'dir.npy').mkdir()
  return 'dir.npy'


def _alarm(seconds):
  """Fails the test instead of hanging it (a FIFO opened would block)."""
  def fail(*_):
    raise AssertionError('blocked: a FIFO was opened')
  signal.signal(signal.SIGALRM, fail)
  signal.alarm(seconds)


@pytest.mark.parametrize('kind', ['absolute', 'dotdot', 'symlink', 'fifo', 'directory'])
def test_feature_paths_stay_in_the_csv_folder(capsys, tmp_path, kind):
  """Refused unless --allow_any_path (which never lets a FIFO or folder be read)."""
  (tmp_path / 'data').mkdir()
  cell = _outside_path(tmp_path, kind)
  src = _csv_input(tmp_path / 'data', cells={(1, 'audio'): cell})
  said = {'absolute': 'absolute path', 'dotdot': "leads out of the CSV's folder",
          'symlink': "leads out of the CSV's folder", 'fifo': 'FIFO',
          'directory': 'a folder'}[kind]
  _alarm(30)
  try:
    line = _refused(capsys, [NO_MODEL, '--input', src, '--output', tmp_path / 'data/out.csv'],
                    tmp_path / 'data', src, f'line 3 (id clip1): audio: {cell}', said)
    if kind not in ('fifo', 'directory'):
      assert '--allow_any_path' in line
    ex = cli.read_input(str(src), allow_any_path=True)
  finally:
    signal.alarm(0)
  if kind in ('fifo', 'directory'):
    assert [(b.row, b.field) for b in ex.bad] == [(1, 'audio')]
  else:
    assert ex.bad == [] and ex.prepare_args['audio'][1].shape == (4, 5)


# ------------------------------------------------------------------------------ 10. --on_bad_rows

def test_skip_leaves_out_refused_rows(tmp_path, run):
  """Under --on_bad_rows=skip the refused and unreadable feature files are reported by row and
  their rows left out; the other rows are written."""
  (tmp_path / 'outside').mkdir()
  np.save(tmp_path / 'outside' / 'x.npy', np.ones((4, 5), np.float32))
  (tmp_path / 'data').mkdir()
  src = _csv_input(tmp_path / 'data', n=4, dims=run['dims'],
                   cells={(1, 'audio'): '../outside/x.npy'})
  (tmp_path / 'data' / 'vision3.npy').write_bytes(b'')
  out, log = tmp_path / 'data' / 'out.csv', tmp_path / 'log.txt'
  with open(log, 'w') as f:
    result = cli.predict_file(run['predictor'], str(src), str(out), on_bad_rows='skip', log=f)
  text = log.read_text()
  assert "line 3 (id clip1): audio: ../outside/x.npy: leads out of the CSV's folder" in text
  assert 'line 5 (id clip3): vision: vision3.npy: an empty file (0 bytes)' in text
  assert result['written'] == 2 and len(result['bad']) == 2
  with open(out, newline='', encoding='utf-8') as f:
    assert [r['id'] for r in csv.DictReader(f)] == ['clip0', 'clip2']
  with open(log, 'w') as f, pytest.raises(cli.InputError, match=r'2 bad row\(s\) of 4 \(the '
                                          r'first: line 3 \(id clip1\)'):
    cli.predict_file(run['predictor'], str(src), str(tmp_path / 'data' / 'o2.csv'), log=f)
  assert not (tmp_path / 'data' / 'o2.csv').exists()


def test_the_whole_command_on_a_good_csv(capsys, tmp_path, run):
  """The command end to end: exit 0, OUT.csv with the text_truncated column."""
  src = _csv_input(tmp_path, dims=run['dims'], prefix=b'\xef\xbb\xbf')
  capsys.readouterr()
  rc = cli.main([run['workdir'], '--input', str(src), '--output', str(tmp_path / 'out.csv')])
  err = capsys.readouterr().err
  assert rc == 0, err
  assert 'wrote 3 rows' in err and 'error:' not in err
  with open(tmp_path / 'out.csv', newline='', encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  assert [r['id'] for r in rows] == ['clip0', 'clip1', 'clip2']
  assert all(r['text_truncated'] == '0' for r in rows)
  assert math.isclose(sum(float(rows[0][f'factual_{c}'])
                          for c in run['predictor'].class_names), 1.0, abs_tol=1e-5)
