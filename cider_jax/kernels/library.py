"""Builds, caches and registers the native CPU kernels of kernels.cc with XLA.

The library is compiled on first use with the system C++ compiler against the XLA FFI
headers that jaxlib ships, for this CPU (-march=native), and cached under
$CIDER_JAX_KERNEL_CACHE (default ~/.cache/cider_jax/kernels), keyed by the source, jaxlib's
version, the compiler and the CPU's model and flags. `available()` says whether it could be
built and why not; the model's 'auto' settings then fall back to the XLA forms.
"""
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'kernels.cc')
_TARGETS = {'cider_block_softmax_forward': 'CiderBlockSoftmaxForward',
            'cider_block_softmax_backward': 'CiderBlockSoftmaxBackward',
            'cider_attention_kl_forward': 'CiderAttentionKlForward',
            'cider_attention_kl_backward': 'CiderAttentionKlBackward',
            'cider_gru_forward': 'CiderGruForward',
            'cider_gru_backward': 'CiderGruBackward',
            'cider_masked_attention_forward': 'CiderMaskedAttentionForward',
            'cider_masked_attention_backward': 'CiderMaskedAttentionBackward',
            'cider_composite_attention_forward': 'CiderCompositeAttentionForward',
            'cider_composite_attention_backward': 'CiderCompositeAttentionBackward',
            'cider_layer_norm_forward': 'CiderLayerNormForward',
            'cider_layer_norm_backward': 'CiderLayerNormBackward',
            'cider_weight_grad': 'CiderWeightGrad',
            'cider_adam': 'CiderAdam',
            'cider_adam_gather': 'CiderAdamGather'}


def _cpu_signature() -> str:
  """CPU model and feature flags: a library built with -march=native runs only on a match."""
  try:
    with open('/proc/cpuinfo') as f:
      lines = [l for l in f if l.startswith(('model name', 'flags', 'Features', 'CPU part'))]
    return ''.join(sorted(set(lines)))
  except OSError:
    return platform.processor() + platform.machine()


def _compiler():
  return os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')


def _build(path: str, compiler: str) -> None:
  """Compiles SOURCE into the shared library `path` (atomically: other processes may race)."""
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=directory)
  os.close(fd)
  cmd = [compiler, '-O3', '-march=native', '-std=c++17', '-shared', '-fPIC',
         '-isystem', jax.ffi.include_dir(), SOURCE, '-o', tmp]
  try:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
      raise RuntimeError(f'{" ".join(cmd)} failed:\n{result.stderr[-2000:]}')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def cached_path(compiler: str) -> str:
  """Where the library built by `compiler` for this source, jaxlib and CPU is cached."""
  import jaxlib
  with open(SOURCE, 'rb') as f:
    key = hashlib.sha256(f.read() + jaxlib.__version__.encode() + compiler.encode()
                         + _cpu_signature().encode()).hexdigest()[:20]
  cache = os.environ.get('CIDER_JAX_KERNEL_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'cider_jax', 'kernels')
  return os.path.join(cache, f'kernels-{key}.so')


@functools.lru_cache(maxsize=None)
def _load():
  """(the library, '') once its targets are registered with XLA, else (None, reason)."""
  if platform.system() != 'Linux' and platform.system() != 'Darwin':
    return None, f'native kernels are built on Linux and macOS only, not {platform.system()}'
  compiler = _compiler()
  if compiler is None:
    return None, 'no C++ compiler found (install g++ or set CXX)'
  path = cached_path(compiler)
  try:
    if not os.path.exists(path):
      _build(path, compiler)
    lib = ctypes.cdll.LoadLibrary(path)
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    return None, f'could not build the native kernels: {e}'
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
  return lib, ''


def available() -> tuple:
  """(usable, reason): whether the kernels are built and registered for the CPU backend."""
  lib, reason = _load()
  return lib is not None, reason


@functools.lru_cache(maxsize=None)
def vector_lanes() -> int:
  """The float32 lanes of the built kernels' vectors: 16 with AVX-512, 8 with AVX/AVX2 (16
  vector registers), 4 with SSE or NEON."""
  return int(require().CiderVectorLanes())


def require():
  """The loaded library; a RuntimeError saying why when it cannot be built."""
  lib, reason = _load()
  if lib is None:
    raise RuntimeError(f'the native kernels are not available: {reason}')
  return lib


def f32(shape):
  """A float32 result shape for a kernel call (loading the library first)."""
  require()
  return jax.ShapeDtypeStruct(shape, jnp.float32)
