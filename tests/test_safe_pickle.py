"""Data files cannot run code: crafted pickles and joblib files are refused before anything
of theirs is called; real MMSA-format files load to the same arrays as an unrestricted load."""
import builtins
import importlib
import os
import pickle
import subprocess
import sys

import joblib
import numpy as np
import pytest

from cider_jax.data import mmsa, safe_pickle
from cider_jax.data.mmsa import DataError
from tests.conftest import make_mmsa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Call:
  """Unpickles as func(*args): what a crafted file does through __reduce__."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


def _attacks(marker):
  """(name, payload, refused global) for each way of running code; every payload would create
  `marker` if it ran."""
  touch = f'touch {marker}'
  return [
      ('os.system', _Call(os.system, touch), f'{os.system.__module__}.system'),
      ('eval', _Call(builtins.eval, f"__import__('os').system({touch!r})"), 'builtins.eval'),
      ('import_module', _Call(importlib.import_module, 'antigravity'),
       'importlib.import_module'),
      ('__import__', _Call(builtins.__import__, 'antigravity'), 'builtins.__import__'),
  ]


def _mmsa_with(payload):
  data = make_mmsa(sizes=(3, 2, 2))
  data['train']['id'] = np.array([payload, 'b', 'c'], dtype=object)  # hidden in an object array
  return data


def _write_pickle(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
  with open(path, 'wb') as f:
    pickle.dump(obj, f, protocol=protocol)
  return str(path)


def _writers():
  return {
      'pickle': lambda p, o: _write_pickle(p, o),
      'pickle-protocol-2': lambda p, o: _write_pickle(p, o, protocol=2),
      'joblib': lambda p, o: (joblib.dump(o, p), str(p))[1],
      'joblib-zlib': lambda p, o: (joblib.dump(o, p, compress=3), str(p))[1],
  }


@pytest.mark.parametrize('writer', sorted(_writers()))
@pytest.mark.parametrize('attack', range(4))
def test_code_running_files_are_refused(tmp_path, writer, attack):
  marker = tmp_path / 'ran'
  name, payload, refused = _attacks(marker)[attack]
  path = _writers()[writer](tmp_path / f'{name}.pkl', _mmsa_with(payload))
  with pytest.raises(DataError) as info:
    mmsa.load_mmsa(path)
  message = str(info.value)
  assert message.startswith(f'{path}: refused to load: the file asks for {refused},')
  assert 'nothing from it was run' in message
  assert not marker.exists()
  if name in ('import_module', '__import__'):
    assert 'antigravity' not in sys.modules


def test_refused_at_top_level_too(tmp_path):
  marker = tmp_path / 'ran'
  path = _write_pickle(tmp_path / 'evil.pkl', _Call(os.system, f'touch {marker}'))
  with pytest.raises(safe_pickle.RefusedGlobal) as info:
    safe_pickle.load(path)
  assert info.value.name == f'{os.system.__module__}.system'
  assert not marker.exists()


def test_validator_cli_prints_one_error_and_runs_nothing(tmp_path):
  marker = tmp_path / 'ran'
  path = _write_pickle(tmp_path / 'evil.pkl', _mmsa_with(_Call(os.system, f'touch {marker}')))
  r = subprocess.run([sys.executable, '-m', 'cider_jax.data.mmsa', path], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and r.stdout == ''
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'error: {path}: refused to load')
  assert not marker.exists()


def test_training_refuses_before_anything_runs(tmp_path):
  marker = tmp_path / 'ran'
  path = str(tmp_path / 'evil.pkl')
  joblib.dump(_mmsa_with(_Call(os.system, f'touch {marker}')), path)
  workdir = tmp_path / 'run'
  r = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'train.py'), '--config',
       os.path.join(ROOT, 'configs', 'quickstart.py'), '--workdir', str(workdir),
       '--config.data.source=mmsa', f'--config.data.file={path}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert r.returncode != 0
  errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'refused to load' in errors[0], r.stderr[-2000:]
  assert 'Traceback' not in r.stderr
  assert not marker.exists()
  assert not (workdir / 'checkpoints').exists() and not (workdir / 'metrics.jsonl').exists()


def _real_format(aligned):
  """MMSA data as the published files hold it: float64 features, string ids and raw text
  (object arrays), numpy scalars inside a split, -inf in audio."""
  data = make_mmsa(sizes=(6, 3, 4), aligned=aligned, audio_len=50 if aligned else 375,
                   vision_len=50 if aligned else 500)
  for k, split in enumerate(data.values()):
    n = len(split['id'])
    split['id'] = np.array([f'clip{k}$_${i}' for i in range(n)], dtype=object)
    split['raw_text'] = np.array([f'sentence {i} é' for i in range(n)], dtype='<U16')
    split['audio'] = split['audio'].astype(np.float64)
    split['audio'][0, 0, 0] = -np.inf
    split['extra_scalar'] = np.float32(1.5)
    split['extra_list'] = [1, 2.5, 'x', None, True, (3, 4)]
  return data


def _assert_same(a, b):
  assert type(a) is type(b)
  if isinstance(a, dict):
    assert list(a) == list(b)
    for k in a:
      _assert_same(a[k], b[k])
  elif isinstance(a, np.ndarray):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  else:
    assert a == b


@pytest.mark.parametrize('aligned', [False, True])
@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_real_pickles_load_as_before(tmp_path, aligned, protocol):
  path = _write_pickle(tmp_path / 'data.pkl', _real_format(aligned), protocol=protocol)
  with open(path, 'rb') as f:
    unrestricted = pickle.load(f)
  _assert_same(safe_pickle.load(path), unrestricted)
  splits = mmsa.load_mmsa(path)
  assert splits['train'].ids[1] == 'clip0$_$1' and splits['test'].raw_text[2] == 'sentence 2 é'


@pytest.mark.parametrize('compress', [0, 3, ('gzip', 3), ('xz', 1)])
def test_joblib_ood_files_load_as_before(tmp_path, compress):
  path = str(tmp_path / 'MOSI_unaligned_50.pkl')
  joblib.dump(_real_format(False), path, compress=compress)
  _assert_same(safe_pickle.load(path), joblib.load(path))
  assert len(mmsa.load_mmsa(path)['valid']) == 3


def test_allow_list_is_numpy_and_joblib_only():
  modules = {name.rsplit('.', 1)[0] for name in safe_pickle.allowed_names()}
  assert modules <= {'numpy', 'numpy._core.multiarray', 'numpy.core.multiarray',
                     'numpy._core.numeric', 'numpy.core.numeric', '_codecs',
                     'joblib.numpy_pickle'}


def test_codecs_encode_only_makes_latin1_bytes(tmp_path):
  path = _write_pickle(tmp_path / 'b.pkl', {'raw': b'\x00\xffabc'}, protocol=2)
  assert safe_pickle.load(path) == {'raw': b'\x00\xffabc'}
  import _codecs  # pylint: disable=g-import-not-at-top
  bad = _write_pickle(tmp_path / 'c.pkl', _Call(_codecs.encode, 'x', 'rot13'), protocol=2)
  with pytest.raises(safe_pickle.RefusedGlobal, match='rot13'):
    safe_pickle.load(bad)
