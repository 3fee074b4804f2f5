"""Reading pickle and joblib data files without letting them run code.

A pickle names the functions that rebuild its objects, and `pickle.load` calls them: a file
from elsewhere can call `os.system`. An MMSA data file needs only numpy arrays (of numbers,
strings or Python objects of the kinds below), numpy scalars and dtypes, and dict / list /
tuple / str / bytes / int / float / bool / None. `load` reads a plain pickle or a joblib file
(joblib's array wrappers and its zlib / gzip / bz2 / xz / lzma compression included) through
an allow-list of exactly those names; any other name the file asks for is refused before it
is looked up, so nothing from the file runs, and `RefusedGlobal` says which name it was.

Nor can a small file make numpy allocate more than the file holds: every array is checked
against its data before numpy is asked for it, and `BadArray` says which array was refused.
An array that numpy allocates ahead of its data (`numpy.ndarray(shape, dtype)`,
`_reconstruct`) may be no larger than the file; one built from data already read (a pickled
array's state, `_frombuffer`) must match that data exactly; a joblib array's data is read as
it comes, so memory grows only with the bytes the (decompressed) stream really holds.

  data = safe_pickle.load('unaligned_50.pkl')
"""
import _compat_pickle
import math
import operator
import os
import pickle

import numpy as np
from joblib import numpy_pickle

__all__ = ['RefusedGlobal', 'BadArray', 'load', 'allowed_names']

_CHUNK = 16 * 1024 * 1024  # bytes of a joblib array's data read at a time


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


class BadArray(pickle.UnpicklingError):
  """An array the file declares but cannot fill: larger than the file, or its data shorter
  or longer than its shape. The message says which shape and dtype, and how many bytes."""


def _shape(shape) -> tuple:
  """`shape` (an int or a sequence of ints >= 0) as a tuple of Python ints; BadArray if it is
  not one."""
  try:
    dims = tuple(operator.index(d) for d in shape) if hasattr(shape, '__iter__') else (
        operator.index(shape),)
  except TypeError:
    raise BadArray(f'an array of shape {shape!r}, which is not a shape') from None
  if any(d < 0 for d in dims):
    raise BadArray(f'an array of shape {dims}, which has a negative size')
  return dims


def _dtype(dtype) -> np.dtype:
  """`dtype` as numpy reads it (a dtype, or a type code such as b'b'); BadArray if it is not
  one."""
  try:
    return np.dtype(dtype.decode('latin1') if isinstance(dtype, bytes) else dtype)
  except (TypeError, ValueError) as e:
    raise BadArray(f'an array of dtype {dtype!r}, which is not a dtype ({e})') from None


def _describe(shape, dtype, nbytes) -> str:
  return f'an array of shape {shape} and dtype {dtype} ({nbytes} bytes)'


class _Unpickler(numpy_pickle.NumpyUnpickler):
  """joblib's unpickler (plain pickles read the same way) restricted to `_ALLOWED`, its arrays
  bounded by the data the file holds (see the module docstring).

  limit: the file's size in bytes; compressed: whether the stream is decompressed (joblib's
  zlib / gzip / ...), so that it may hold more array data than the file's size.
  """

  dispatch = numpy_pickle.NumpyUnpickler.dispatch.copy()

  def __init__(self, path, fobj, limit: int, compressed: bool):
    super().__init__(path, fobj, ensure_native_byte_order=True)
    self.limit, self.compressed = limit, compressed

  def find_class(self, module, name):
    if self.proto < 3:  # Python 2 names (__builtin__, copy_reg, ...) as Python 3 reads them
      module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
      module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise RefusedGlobal(f'{module}.{name}') from None

  # ---------------------------------------------------------------- arrays ahead of their data

  def _check_ahead(self, func, args, kwargs=None):
    """BadArray if calling `func` (a name of the allow-list) would allocate an array larger
    than the file: numpy.ndarray(shape, dtype, ...) and _reconstruct(ndarray, shape, dtype)
    allocate before any data is given (numpy's own pickles ask _reconstruct for shape (0,))."""
    kwargs = kwargs or {}
    if func is np.ndarray:
      if not args and 'shape' not in kwargs:
        return  # numpy refuses it: no shape
      shape = args[0] if args else kwargs['shape']
      dtype = args[1] if len(args) > 1 else kwargs.get('dtype', float)
    elif func is _ALLOWED[('numpy._core.multiarray', '_reconstruct')]:
      if len(args) != 3:
        return  # numpy refuses it: _reconstruct takes (subtype, shape, dtype)
      shape, dtype = args[1], args[2]
    else:
      return
    shape, dtype = _shape(shape), _dtype(dtype)
    nbytes = math.prod(shape) * max(dtype.itemsize, 1)
    if nbytes > self.limit:
      raise BadArray(f'{_describe(shape, dtype, nbytes)} allocated ahead of its data, larger '
                     f'than the whole file ({self.limit} bytes)')

  def load_reduce(self):
    self._check_ahead(self.stack[-2], self.stack[-1])
    pickle._Unpickler.load_reduce(self)  # pylint: disable=protected-access
  dispatch[pickle.REDUCE[0]] = load_reduce

  def load_newobj(self):
    self._check_ahead(self.stack[-2], self.stack[-1])
    pickle._Unpickler.load_newobj(self)  # pylint: disable=protected-access
  dispatch[pickle.NEWOBJ[0]] = load_newobj

  def load_newobj_ex(self):
    self._check_ahead(self.stack[-3], self.stack[-2], self.stack[-1])
    pickle._Unpickler.load_newobj_ex(self)  # pylint: disable=protected-access
  dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

  def _instantiate(self, klass, args):  # the INST and OBJ opcodes of protocols 0 and 1
    self._check_ahead(klass, tuple(args))
    super()._instantiate(klass, args)

  # ---------------------------------------------------------------- arrays from their data

  def load_build(self):
    """BUILD: a numpy array's state is checked against its data before numpy reads it; a
    joblib array wrapper is replaced by its array, read from the stream (`_read_wrapped`)."""
    inst, state = self.stack[-2], self.stack[-1]
    if isinstance(inst, np.ndarray):
      _check_state(state)
    pickle._Unpickler.load_build(self)  # pylint: disable=protected-access
    if isinstance(self.stack[-1], numpy_pickle.NumpyArrayWrapper):
      self.stack[-1] = self._read_wrapped(self.stack[-1])
  dispatch[pickle.BUILD[0]] = load_build

  def _read_wrapped(self, wrapper) -> np.ndarray:
    """The array a joblib NumpyArrayWrapper stands for, as joblib reads it (mmap aside): the
    data that follows in the stream, or a nested pickle for arrays of objects, read by an
    unpickler of this kind."""
    shape = _shape(getattr(wrapper, 'shape', None))
    dtype = getattr(wrapper, 'dtype', None)
    order = getattr(wrapper, 'order', 'C')
    if not isinstance(dtype, np.dtype) or order not in ('C', 'F'):
      raise BadArray(f'a joblib array of dtype {dtype!r} in order {order!r}; expected a numpy '
                     "dtype and order 'C' or 'F'")
    if dtype.hasobject:
      array = _Unpickler(self.filename, self.file_handle, self.limit, self.compressed).load()
    else:
      count = math.prod(shape)
      nbytes = count * dtype.itemsize
      if not self.compressed and count * max(dtype.itemsize, 1) > self.limit:
        raise BadArray(f'{_describe(shape, dtype, nbytes)}, larger than the whole file '
                       f'({self.limit} bytes)')
      if getattr(wrapper, 'numpy_array_alignment_bytes', None) is not None:
        padding = self.file_handle.read(1)  # joblib >= 1.2: its length, then the padding
        self.file_handle.read(int.from_bytes(padding, 'little'))
      if dtype.itemsize == 0:
        if count > self.limit:
          raise BadArray(f'{_describe(shape, dtype, 0)} of {count} elements, more than the '
                         f'file has bytes ({self.limit})')
        flat = np.zeros(count, dtype)
      else:
        flat = np.frombuffer(self._read_data(nbytes, shape, dtype), dtype=dtype, count=count)
      array = flat.reshape(shape[::-1]).transpose() if order == 'F' else flat.reshape(shape)
    return numpy_pickle._ensure_native_byte_order(array)  # pylint: disable=protected-access

  def _read_data(self, nbytes, shape, dtype) -> bytearray:
    """The next `nbytes` bytes of the stream, read in chunks: memory grows with the bytes the
    stream really holds, never ahead of them. BadArray if it ends first."""
    data = bytearray()
    while len(data) < nbytes:
      chunk = self.file_handle.read(min(_CHUNK, nbytes - len(data)))
      if not chunk:
        raise BadArray(f'{_describe(shape, dtype, nbytes)} whose data ends after '
                       f'{len(data)} bytes')
      data += chunk
    return data


def _check_state(state) -> None:
  """BadArray unless `state` (what ndarray.__setstate__ is given: ([version,] shape, dtype,
  is_fortran, data)) holds exactly the data its shape and dtype declare: numpy allocates the
  declared size first, and for arrays of objects reads past a shorter list."""
  if not isinstance(state, tuple) or len(state) not in (4, 5):
    raise BadArray(f'an array state of {type(state).__name__}; expected numpy\'s '
                   '(version, shape, dtype, is_fortran, data)')
  shape, dtype, data = state[-4], state[-3], state[-1]
  if not isinstance(shape, tuple) or not isinstance(dtype, np.dtype):
    raise BadArray(f'an array state with shape {shape!r} and dtype {dtype!r}; expected a tuple '
                   'and a numpy dtype')
  shape = _shape(shape)
  count = math.prod(shape)
  if dtype.hasobject:
    if not isinstance(data, list) or len(data) != count:
      held = f'{len(data)} items' if isinstance(data, list) else type(data).__name__
      raise BadArray(f'an array of shape {shape} and dtype {dtype} ({count} items) whose data '
                     f'holds {held}')
    return
  if isinstance(data, (bytes, bytearray, str)):
    size = len(data)
  else:
    try:
      size = memoryview(data).nbytes
    except TypeError:
      raise BadArray(f'an array of shape {shape} and dtype {dtype} whose data is '
                     f'{type(data).__name__}, not bytes') from None
  nbytes = count * dtype.itemsize
  if size != nbytes:
    raise BadArray(f'{_describe(shape, dtype, nbytes)} whose data holds {size} bytes')


def load(path):
  """The object in a pickle or joblib file at `path`, built from allowed names only.

  Raises RefusedGlobal for a disallowed name, BadArray for an array the file cannot fill
  (before it is allocated); other errors (truncated or not a pickle) as the unpickler raises
  them.
  """
  path = os.fspath(path)
  with open(path, 'rb') as f:
    limit = os.fstat(f.fileno()).st_size
    # detects joblib's compressed containers; a plain pickle comes back as the file itself
    validated = numpy_pickle._validate_fileobject_and_memmap  # pylint: disable=protected-access
    with validated(f, path, None) as (fobj, _):
      if isinstance(fobj, str):
        raise pickle.UnpicklingError('a joblib file older than joblib 0.10 (not supported)')
      return _Unpickler(path, fobj, limit, compressed=fobj is not f).load()
