"""Reading pickle and joblib data files without letting them run code.

A pickle names the functions that rebuild its objects, and `pickle.load` calls them: a file
from elsewhere can call `os.system`. An MMSA data file needs only numpy arrays (of numbers,
strings or Python objects of the kinds below), numpy scalars and dtypes, and dict / list /
tuple / str / bytes / int / float / bool / None. `load` reads a plain pickle or a joblib file
(joblib's array wrappers and its zlib / gzip / bz2 / xz / lzma compression included) through
an allow-list of exactly those names; any other name the file asks for is refused before it
is looked up, so nothing from the file runs, and `RefusedGlobal` says which name it was.

  data = safe_pickle.load('unaligned_50.pkl')
"""
import _compat_pickle
import os
import pickle

import numpy as np
from joblib import numpy_pickle

__all__ = ['RefusedGlobal', 'load', 'allowed_names']


class RefusedGlobal(pickle.UnpicklingError):
  """The file asked for a name outside the allow-list (`.name`, e.g. 'posix.system')."""

  def __init__(self, name: str):
    super().__init__(name)
    self.name = name


def _allowed() -> dict:
  """{(module, name) as written in a pickle: the object it resolves to}."""
  reconstruct = np._core.multiarray._reconstruct  # pylint: disable=protected-access
  scalar = np._core.multiarray.scalar  # pylint: disable=protected-access
  frombuffer = np._core.numeric._frombuffer  # pylint: disable=protected-access
  out = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype,
         ('_codecs', 'encode'): _latin1_encode,
         ('joblib.numpy_pickle', 'NumpyArrayWrapper'): numpy_pickle.NumpyArrayWrapper}
  # numpy 2 writes numpy._core, numpy 1 wrote numpy.core: the same three functions
  for core in ('numpy._core', 'numpy.core'):
    out[(f'{core}.multiarray', '_reconstruct')] = reconstruct
    out[(f'{core}.multiarray', 'scalar')] = scalar
    out[(f'{core}.numeric', '_frombuffer')] = frombuffer
  return out


def _latin1_encode(text, encoding='latin1'):
  """`_codecs.encode` as protocol-2 pickles use it for bytes: latin-1 text to bytes only."""
  if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
    raise RefusedGlobal(f'_codecs.encode({type(text).__name__}, {encoding!r})')
  return text.encode('latin1')


_ALLOWED = _allowed()


def allowed_names() -> list:
  """The 'module.name' globals a data file may use, sorted."""
  return sorted(f'{m}.{n}' for m, n in _ALLOWED)


class _Unpickler(numpy_pickle.NumpyUnpickler):
  """joblib's unpickler (plain pickles read the same way) restricted to `_ALLOWED`.

  joblib routes the nested pickle of object arrays through this `find_class` too.
  """

  def find_class(self, module, name):
    if self.proto < 3:  # Python 2 names (__builtin__, copy_reg, ...) as Python 3 reads them
      module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
      module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise RefusedGlobal(f'{module}.{name}') from None


def load(path):
  """The object in a pickle or joblib file at `path`, built from allowed names only.

  Raises RefusedGlobal for a disallowed name; other errors (truncated or not a pickle) as
  the unpickler raises them.
  """
  path = os.fspath(path)
  with open(path, 'rb') as f:
    # detects joblib's compressed containers; a plain pickle comes back as the file itself
    validated = numpy_pickle._validate_fileobject_and_memmap  # pylint: disable=protected-access
    with validated(f, path, None) as (fobj, _):
      if isinstance(fobj, str):
        raise pickle.UnpicklingError('a joblib file older than joblib 0.10 (not supported)')
      return _Unpickler(path, fobj, ensure_native_byte_order=True).load()
