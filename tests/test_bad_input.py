"""Bad input gives one `error:` line naming the file or field and what to do, never a
traceback, changes no input and leaves no partial output: data files that declare arrays far
larger than themselves (refused before anything is allocated), MMSA fields of the wrong length
or kind, launcher flags (a missing config file, a workdir that cannot be one, --help) and
damaged run directories (checkpoint meta, constants.npz, eval/report.json)."""
import hashlib
import io
import importlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zlib

import joblib
import numpy as np
import pytest

from cider_jax import checkpoint as ckpt_lib
from cider_jax import configuration, evaluate
from cider_jax.data import mmsa, ood_split, safe_pickle
from tests.conftest import make_mmsa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUGE = (10**9, 100)          # 800 GB of float64
PEAK_MB = 500                # what a refused file may cost a command

# runs `python -m MODULE ARGS` with its address space capped at 4 GB (a regression fails the
# test instead of taking the machine's memory) and, at exit, writes its /proc/self/status to
# $CIDER_JAX_STATUS: VmHWM there is the peak memory of this program alone (the resource usage
# of a child counts what it had before exec, a copy of the test process)
_CAPPED = ('import atexit, os, resource, runpy, sys; '
           'resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); '
           'atexit.register(lambda: open(os.environ["CIDER_JAX_STATUS"], "w").write('
           'open("/proc/self/status").read())); '
           'del sys.argv[0]; runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)')


def _run(args, capped=False):
  """(exit code, stdout, stderr, peak resident memory in MB or None) of `python ARGS` (with
  capped: `python -m ARGS` under the 4 GB cap, its peak measured) in the repository root, on
  CPU."""
  with tempfile.TemporaryDirectory() as tmp:
    status = os.path.join(tmp, 'status')
    argv = [sys.executable, '-c', _CAPPED, *args] if capped else [sys.executable, *args]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS='cpu', CIDER_JAX_STATUS=status))
    peak = None
    if capped and os.path.exists(status):
      with open(status) as f:
        kb = [line.split()[1] for line in f if line.startswith('VmHWM:')]
      peak = int(kb[0]) / 1024 if kb else None
    return r.returncode, r.stdout, r.stderr, peak


def _one_error(stderr):
  """The only `error:` line of stderr (asserting there is one and no traceback)."""
  assert 'Traceback' not in stderr, stderr[-3000:]
  errors = [line for line in stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, stderr[-3000:]
  return errors[0]


def _digest(path):
  """{relative path: sha1} of a file or of every file under a folder."""
  if os.path.isfile(path):
    with open(path, 'rb') as f:
      return {'': hashlib.sha1(f.read()).hexdigest()}
  out = {}
  for folder, _, files in os.walk(path):
    for name in files:
      full = os.path.join(folder, name)
      with open(full, 'rb') as f:
        out[os.path.relpath(full, path)] = hashlib.sha1(f.read()).hexdigest()
  return out


def _write_pickle(path, obj):
  with open(path, 'wb') as f:
    pickle.dump(obj, f, protocol=4)
  return str(path)


# ------------------------------------------------------------------ A: arrays the file cannot fill


class _Reduce:
  """Pickles as the given __reduce__ value: what a crafted file holds."""

  def __init__(self, *value):
    self.value = value

  def __reduce__(self):
    return self.value


def _small_mmsa():
  return make_mmsa(sizes=(3, 2, 2), text_len=8, audio_len=4, vision_len=4, audio_dim=2,
                   vision_dim=2)


def _huge_pickle(path, how):
  """A pickle of a few KB whose train audio asks numpy for HUGE float64 / object arrays."""
  rec = np._core.multiarray._reconstruct  # pylint: disable=protected-access
  payload = {
      # numpy.ndarray(shape, dtype): allocated at once
      'ndarray': _Reduce(np.ndarray, (HUGE, np.dtype('f8'))),
      # _reconstruct(ndarray, shape, dtype): numpy's own pickles ask it for shape (0,)
      'reconstruct': _Reduce(rec, (np.ndarray, HUGE, b'd')),
      # an array state of objects with one item for 10**11 (numpy allocates, then reads past
      # the list)
      'object_state': _Reduce(rec, (np.ndarray, (0,), b'b'),
                              (1, HUGE, np.dtype('O'), False, [None])),
  }[how]
  data = _small_mmsa()
  data['train']['audio'] = payload
  return _write_pickle(path, data)


def _huge_joblib(path, compressed):
  """A joblib file (zlib-compressed or not) whose array wrapper declares shape HUGE with 280
  bytes of data."""
  buf = io.BytesIO()
  joblib.dump({'train': {'audio': np.zeros((7, 5))}}, buf, protocol=2)
  raw = buf.getvalue()
  shape = b'K\x07K\x05\x86'  # the pickled (7, 5)
  assert raw.count(shape) == 1
  raw = raw.replace(shape, b'J' + (10**9).to_bytes(4, 'little') + b'Kd\x86')
  with open(path, 'wb') as f:
    f.write(zlib.compress(raw) if compressed else raw)
  return str(path)


HUGE_FILES = {
    'ndarray': lambda p: _huge_pickle(p, 'ndarray'),
    'reconstruct': lambda p: _huge_pickle(p, 'reconstruct'),
    'object_state': lambda p: _huge_pickle(p, 'object_state'),
    'joblib': lambda p: _huge_joblib(p, compressed=False),
    'joblib_zlib': lambda p: _huge_joblib(p, compressed=True),
}


@pytest.mark.parametrize('command', ['mmsa', 'ood_split'])
@pytest.mark.parametrize('kind', sorted(HUGE_FILES))
def test_huge_declared_array_is_refused_before_allocation(tmp_path, kind, command):
  path = HUGE_FILES[kind](tmp_path / 'huge.pkl')
  assert os.path.getsize(path) < 16_000
  before = _digest(path)
  out = tmp_path / 'out.pkl'
  args = (['cider_jax.data.mmsa', path] if command == 'mmsa' else
          ['cider_jax.data.ood_split', path, str(out), '--task', 'binary'])
  code, stdout, stderr, peak_mb = _run(args, capped=True)
  assert code == 1 and stdout == ''
  error = _one_error(stderr)
  assert error.startswith(f'error: {path}: refused to load: it declares an array of shape '
                          '(1000000000, 100)'), error
  assert 'replace it with the original' in error
  assert peak_mb is not None and peak_mb < PEAK_MB, peak_mb
  assert _digest(path) == before
  assert sorted(os.listdir(tmp_path)) == ['huge.pkl']  # no OUT.pkl, OUT.json or temporary


def test_real_arrays_still_load(tmp_path):
  """The bounds refuse nothing a real file holds: C and Fortran order, big-endian, structured,
  empty, 0-d and object arrays, as pickles and (compressed) joblib files."""
  arrays = {'f': np.asfortranarray(np.arange(12.).reshape(3, 4)), 'be': np.arange(5, dtype='>i4'),
            'rec': np.zeros(3, dtype=[('a', '<f4'), ('b', 'i8')]), 'empty': np.zeros((0, 5)),
            'scalar': np.array(3.5), 'obj': np.array(['a', None, 3], dtype=object),
            'text': np.array(['ab', 'c']), 'big': np.arange(300_000, dtype=np.float64)}
  for compress in (0, 3, ('xz', 1)):
    path = str(tmp_path / 'j.pkl')
    joblib.dump(arrays, path, compress=compress)
    mine, theirs = safe_pickle.load(path), joblib.load(path)
    for k, a in theirs.items():
      assert mine[k].dtype == a.dtype and mine[k].shape == a.shape
      assert mine[k].tolist() == a.tolist()
  for protocol in (4, 5):
    path = str(tmp_path / 'p.pkl')
    with open(path, 'wb') as f:
      pickle.dump(arrays, f, protocol=protocol)
    with open(path, 'rb') as f:
      theirs = pickle.load(f)
    mine = safe_pickle.load(path)
    for k, a in theirs.items():
      assert mine[k].dtype == a.dtype and mine[k].shape == a.shape
      assert mine[k].tolist() == a.tolist()


# ------------------------------------------------------------------ B: MMSA fields


def _set(split, field, fn):
  def corrupt(data):
    data[split][field] = fn(data[split][field])
    return data
  return corrupt


# (corruption, field, words the error must hold)
BAD_FIELDS = {
    'id_shorter': (_set('train', 'id', lambda a: a[:-2]), 'id',
                   ['has 10 entries but text_bert has 12 examples', 'expected 12 entries']),
    'id_longer': (_set('valid', 'id', lambda a: list(a) + ['extra']), 'id',
                  ['has 6 entries but text_bert has 5 examples', 'expected 5 entries']),
    'id_single': (_set('test', 'id', lambda a: 'clip'), 'id',
                  ['a single str, not a list', 'one entry per example']),
    'audio_lengths_text': (_set('train', 'audio_lengths',
                                lambda a: np.array([str(v) for v in a], dtype=object)),
                           'audio_lengths', ['example 0', 'holds text', 'not numbers',
                                             'integer lengths']),
    'vision_lengths_text': (_set('test', 'vision_lengths', lambda a: a.astype(str)),
                            'vision_lengths', ['holds text (dtype <U', 'integer lengths']),
}


@pytest.mark.parametrize('case', sorted(BAD_FIELDS))
def test_bad_mmsa_field_is_one_error_line(tmp_path, capsys, case):
  corrupt, field, words = BAD_FIELDS[case]
  path = _write_pickle(tmp_path / 'bad.pkl', corrupt(make_mmsa()))
  before = _digest(path)
  assert mmsa.main([path]) == 1
  captured = capsys.readouterr()
  assert captured.out == ''
  error = _one_error(captured.err)
  assert error.startswith(f'error: {path}: split ') and f"field '{field}'" in error, error
  for word in words:
    assert word in error, (word, error)
  out = tmp_path / 'out.pkl'
  assert ood_split.main([path, str(out), '--task', 'binary', '--no_probe']) == 1
  assert _one_error(capsys.readouterr().err) == error
  assert _digest(path) == before
  assert sorted(os.listdir(tmp_path)) == ['bad.pkl']


# ------------------------------------------------------------------ C: launchers


@pytest.mark.parametrize('launcher', ['train', 'evaluate', 'sweep'])
def test_help_exits_0(launcher):
  code, stdout, stderr, _ = _run([os.path.join('launch', f'{launcher}.py'), '--help'])
  assert code == 0, stderr[-2000:]
  assert 'flags:' in stdout and '--workdir' in stdout
  assert 'Traceback' not in stderr


def test_missing_config_file(tmp_path):
  workdir = tmp_path / 'run'
  code, stdout, stderr, _ = _run([os.path.join('launch', 'train.py'), '--config',
                                  'configs/nope.py', '--workdir', str(workdir),
                                  '--config.train.batch_size=4'])
  assert code == 2 and stdout == ''
  assert _one_error(stderr) == ('error: --config configs/nope.py: no such file; give a config '
                                'file such as configs/quickstart.py (configs/*.py)')
  assert not workdir.exists()


def _workdirs(tmp_path):
  """{name: (workdir, the words of its error)}; tmp_path/file is an existing file."""
  file = tmp_path / 'file'
  file.write_text('not a run')
  return {'file': (str(file), 'is a file, not a directory'),
          'under_file': (str(file / 'run'), f'is under {file}, which is a file'),
          'unwritable': ('/proc/cider_jax_bad_input_run',
                         'cannot be made: no folder can be created in /proc')}


@pytest.mark.parametrize('case', ['file', 'under_file', 'unwritable'])
def test_unusable_train_workdir(tmp_path, case):
  workdir, words = _workdirs(tmp_path)[case]
  before = _digest(tmp_path)
  code, stdout, stderr, _ = _run([os.path.join('launch', 'train.py'), '--config',
                                  'configs/quickstart.py', '--workdir', workdir])
  assert code == 2 and stdout == ''
  error = _one_error(stderr)
  assert error.startswith(f'error: workdir {workdir!r} {words}'), error
  assert error.endswith('choose another --workdir')
  assert _digest(tmp_path) == before and sorted(os.listdir(tmp_path)) == ['file']
  assert not os.path.exists('/proc/cider_jax_bad_input_run')


def test_check_workdir_accepts_new_and_existing_folders(tmp_path):
  configuration.check_workdir(str(tmp_path))
  configuration.check_workdir(str(tmp_path / 'new' / 'run'))
  assert os.listdir(tmp_path) == []  # checked without leaving anything


def test_evaluate_workdir_that_is_a_file(tmp_path):
  file = tmp_path / 'run'
  file.write_text('not a run')
  code, stdout, stderr, _ = _run([os.path.join('launch', 'evaluate.py'), '--config',
                                  'configs/quickstart.py', '--workdir', str(file)])
  assert code == 2
  error = _one_error(stderr)
  assert error == (f'error: workdir {str(file)!r} is a file, not a directory; choose another '
                   '--workdir')
  assert file.read_text() == 'not a run' and os.listdir(tmp_path) == ['run']
  with pytest.raises(evaluate.EvaluationError, match='is a file, not a directory'):
    evaluate.check_trained_run(str(file))


# ------------------------------------------------------------------ D: damaged run directories


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """(config, workdir) of a run as training leaves it (constants.npz, a best checkpoint), built
  once without training; tests damage copies of it."""
  from tests.helpers import runs  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp('finished_run')
  config = runs.small_config(tmp)
  workdir = str(tmp / 'run')
  runs.random_best_run(config, workdir, evaluate=False)
  return config, workdir


def _truncate(path, keep=0.5):
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:int(len(data) * keep)])


META = os.path.join('checkpoints', 'best', '1', 'meta', 'metadata')

# (damage, the damaged file, words of the error)
DAMAGES = {
    'meta_truncated': (lambda w: _truncate(os.path.join(w, META)), META,
                       ['is not valid JSON', 'train the run again with a fresh --workdir']),
    'meta_deleted': (lambda w: os.remove(os.path.join(w, META)), META,
                     ['is missing', 'train the run again with a fresh --workdir']),
    'meta_folder_deleted': (lambda w: shutil.rmtree(os.path.dirname(os.path.join(w, META))),
                            META, ['is missing']),
    'meta_without_spec': (lambda w: ckpt_lib.write_text(os.path.join(w, META), '{"epoch": 1}'),
                          META, ["has no 'spec'"]),
    'constants_truncated': (lambda w: _truncate(os.path.join(w, 'constants.npz')),
                            'constants.npz', ['is damaged', 'delete it: python launch/train.py']),
    'constants_empty': (lambda w: _truncate(os.path.join(w, 'constants.npz'), 0),
                        'constants.npz', ['is damaged', 'delete it']),
    'constants_without_prototypes': (
        lambda w: ckpt_lib.write_npz(os.path.join(w, 'constants.npz'),
                                     {'prior': np.ones(3, np.float32)}),
        'constants.npz', ['has no cls_feats, bias_vocab', 'delete it']),
}


def _damaged_copy(finished_run, tmp_path, damage):
  config, source = finished_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  DAMAGES[damage][0](workdir)
  return config, workdir


@pytest.mark.parametrize('damage', sorted(DAMAGES))
def test_damaged_run_is_one_error(finished_run, tmp_path, damage):
  config, workdir = _damaged_copy(finished_run, tmp_path, damage)
  _, file, words = DAMAGES[damage]
  before = _digest(workdir)
  with pytest.raises(ckpt_lib.CheckpointError) as info:  # launch/evaluate.py: `error:` line
    evaluate.evaluate(config, workdir)
  message = str(info.value)
  assert '\n' not in message
  assert os.path.join(workdir, file) in message, message
  for word in words:
    assert word in message, (word, message)
  assert _digest(workdir) == before and not os.path.exists(os.path.join(workdir, 'eval'))


def _small_config_flags(config):
  """The --config.* flags that make configs/quickstart.py the test's small configuration."""
  s = config.data.synthetic
  return [f'--config.data.synthetic.{k}={getattr(s, k)}'
          for k in ('n_train', 'n_valid', 'n_test', 'text_len', 'audio_len', 'vision_len')] + [
              f'--config.data.cache_dir={config.data.cache_dir}',
              f'--config.model.text_encoder.num_layers={config.model.text_encoder.num_layers}',
              f'--config.model.layers={config.model.layers}',
              '--config.train.compilation_cache=']


@pytest.mark.parametrize('damage', ['meta_truncated', 'constants_truncated'])
def test_evaluate_launcher_on_damaged_run(finished_run, tmp_path, damage):
  config, workdir = _damaged_copy(finished_run, tmp_path, damage)
  before = _digest(workdir)
  code, _, stderr, _ = _run([os.path.join('launch', 'evaluate.py'), '--config',
                             'configs/quickstart.py', '--workdir', workdir,
                             *_small_config_flags(config)])
  assert code == 2
  error = _one_error(stderr)
  assert os.path.join(workdir, DAMAGES[damage][1]) in error, error
  assert _digest(workdir) == before and not os.path.exists(os.path.join(workdir, 'eval'))


REPORTS = {
    'truncated': ('{"tau": {"value": 0.', 'is not a valid report'),
    'not_an_object': ('[0.5]', 'holds a JSON list, not a report'),
    'tau_text': ('{"tau": {"value": "abc"}}', "tau.value is 'abc'; expected a finite number >= 0"),
    'tau_nan': ('{"tau": {"value": NaN}}', 'tau.value is nan; expected a finite number >= 0'),
    'tau_negative': ('{"tau": {"value": -1}}', 'tau.value is -1; expected a finite number'),
}


@pytest.mark.parametrize('case', sorted(REPORTS))
def test_damaged_report_tau(tmp_path, case):
  text, words = REPORTS[case]
  report = tmp_path / 'eval' / 'report.json'
  report.parent.mkdir()
  report.write_text(text)
  with pytest.raises(evaluate.EvaluationError) as info:
    evaluate.read_tau(str(tmp_path))
  message = str(info.value)
  assert '\n' not in message and message.startswith(str(report)), message
  assert words in message, message
  assert 'delete it and run python launch/evaluate.py' in message
  assert report.read_text() == text


def test_report_tau_as_written(tmp_path):
  assert evaluate.read_tau(str(tmp_path)) is None  # no report
  report = tmp_path / 'eval' / 'report.json'
  report.parent.mkdir()
  for text, tau in (('{"tau": {"value": 0.25}}', 0.25), ('{"tau": null}', None),
                    ('{"tau": {"value": 0}}', 0.0)):
    report.write_text(text)
    assert evaluate.read_tau(str(tmp_path)) == tau


@pytest.mark.parametrize('damage', ['meta_truncated', 'meta_without_spec', 'constants_truncated',
                                    'report_tau_text'])
def test_predict_on_damaged_run(finished_run, tmp_path, capsys, damage):
  """The predict command (in-process) on a damaged run: one error line naming the file."""
  predict = importlib.import_module('cider_jax.predict')  # the command's module
  config, workdir = _damaged_copy(finished_run, tmp_path,
                                  'meta_without_spec' if damage == 'report_tau_text' else damage)
  if damage == 'report_tau_text':   # a sound checkpoint, a report whose τ is text
    shutil.rmtree(workdir)
    shutil.copytree(finished_run[1], workdir)
    os.makedirs(os.path.join(workdir, 'eval'))
    with open(os.path.join(workdir, 'eval', 'report.json'), 'w') as f:
      f.write('{"tau": {"value": "abc"}}')
    file = os.path.join('eval', 'report.json')
  else:
    file = DAMAGES[damage][1]
  np.save(tmp_path / 'a.npy', np.ones((6, 5), np.float32))
  np.save(tmp_path / 'v.npy', np.ones((5, 20), np.float32))
  csv_path = tmp_path / 'in.csv'
  csv_path.write_text('id,text,audio,vision\na,what a film,a.npy,v.npy\n')
  out = tmp_path / 'out.csv'
  before = _digest(workdir)
  code = predict.main([workdir, '--input', str(csv_path), '--output', str(out)])
  err = capsys.readouterr().err
  assert code != 0 and 'Traceback' not in err
  error = _one_error(err)
  assert os.path.join(workdir, file) in error, error
  assert _digest(workdir) == before and not out.exists()
