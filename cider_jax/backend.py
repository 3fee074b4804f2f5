"""The one place where the model's implementations are chosen (config.model.kernels).

  ops = backend.select(config.model.kernels, head_size)   # a models.ops.Ops
  model = CIDer(..., ops=ops)

'native': the native CPU kernels (cider_jax/kernels/), which need the CPU backend, a head
size they have and a C++ compiler; an error otherwise. 'xla': plain JAX. 'auto' (default):
native where usable, else plain JAX. On the CPU backend the plain-JAX choice also takes the
CPU forms measured faster there (models.ops.CPU); elsewhere, where they have not been
measured, the plain forms (models.ops.PLAIN).
"""
import sys

import jax

from cider_jax.kernels import attention as native_attention
from cider_jax.kernels import library
from cider_jax.kernels.ops import NATIVE
from cider_jax.models import ops as ops_lib

CHOICES = ('auto', 'native', 'xla')


def resolve(choice: str, head_size: int) -> str:
  """model.kernels resolved to 'native' or 'xla' for the default backend; head_size: the MCT's
  (embed_dim / num_heads). 'auto' prints a note on stderr when only the build failed."""
  if choice not in CHOICES:
    raise ValueError(f"model.kernels must be 'auto', 'native' or 'xla', got {choice!r}")
  if choice == 'xla':
    return 'xla'
  problems = []
  if jax.default_backend() != 'cpu':
    problems.append(f'the default backend is {jax.default_backend()!r}, not cpu')
  if not native_attention.supports(head_size):
    problems.append(f'head size {head_size} is not one of {native_attention.HEAD_SIZES}')
  if not problems:
    ok, reason = library.available()
    if ok:
      return 'native'
    problems.append(reason)
    if choice == 'auto':
      print(f'note: model.kernels=auto uses xla: {reason}', file=sys.stderr)
  if choice == 'native':
    raise ValueError('model.kernels=native is not usable: ' + '; '.join(problems))
  return 'xla'


def plain_ops() -> ops_lib.Ops:
  """The plain-JAX implementations for the default backend."""
  return ops_lib.CPU if jax.default_backend() == 'cpu' else ops_lib.PLAIN


def select(choice: str, head_size: int) -> ops_lib.Ops:
  """The implementations for model.kernels = choice (see the module docstring)."""
  return NATIVE if resolve(choice, head_size) == 'native' else plain_ops()
