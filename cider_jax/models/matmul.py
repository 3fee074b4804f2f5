"""Dense layers for the `model.dtype` option (the text encoder's matrix products).

With dtype float32 this is a plain `nn.Dense`. With bfloat16 the operands are
rounded to bfloat16 while every product, forward and backward, accumulates and returns
float32 (`preferred_element_type`): on CPUs with AMX or AVX512-BF16 XLA runs such products as
native bfloat16 matrix instructions, and nothing around them (bias, softmax, LayerNorm, GELU,
the gradients that reach the float32 parameters) is rounded. The backward products are
written out here because JAX's own transpose of a bfloat16 product would take a float32
cotangent and run the slow float32 path.

Only the Dense contraction (last axis of x with the kernel's first) is offered: XLA:CPU runs a
bfloat16 × bfloat16 → float32 product only where its library fusion takes the layout, and some
batched attention layouts (e.g. 'bqhd,bhqk->bkhd') stop at run time with "Unsupported element
type for DotThunk"; the Dense products and their transposes are tested to run.
"""
import functools
import string
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _transposed_specs(spec: str):
  """'A,B->C' → ('C,B->A', 'A,C->B'): the products giving the cotangents of A and B."""
  ins, out = spec.replace(' ', '').split('->')
  a, b = ins.split(',')
  for name, s, others in (('first', a, b + out), ('second', b, a + out)):
    if any(c not in others for c in s):
      raise ValueError(f'einsum {spec!r}: an index of the {name} operand is summed within it')
  return f'{out},{b}->{a}', f'{a},{out}->{b}'


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _mixed(spec, a, b, dtype):
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _mixed_fwd(spec, a, b, dtype):
  a_c, b_c = a.astype(dtype), b.astype(dtype)
  out = jnp.einsum(spec, a_c, b_c, preferred_element_type=jnp.float32)
  # the zero-size arrays carry the input dtypes to the backward pass
  return out, (a_c, b_c, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))


def _mixed_bwd(spec, dtype, res, g):
  a_c, b_c, a_tag, b_tag = res
  spec_a, spec_b = _transposed_specs(spec)
  g = g.astype(dtype)
  da = jnp.einsum(spec_a, g, b_c, preferred_element_type=jnp.float32)
  db = jnp.einsum(spec_b, a_c, g, preferred_element_type=jnp.float32)
  return da.astype(a_tag.dtype), db.astype(b_tag.dtype)


_mixed.defvjp(_mixed_fwd, _mixed_bwd)


def _mixed_einsum(spec: str, a, b, dtype):
  """`jnp.einsum(spec, a, b)` with operands in dtype and products in float32."""
  _transposed_specs(spec)
  return _mixed(spec, a, b, jnp.dtype(dtype))


def _dense_dot_general(dtype, lhs, rhs, dimension_numbers, precision=None,
                       preferred_element_type=None):
  """The product of `nn.Dense` (last axis of lhs with the kernel's first) as a mixed einsum."""
  del precision, preferred_element_type
  (contract_l, contract_r), batch = dimension_numbers
  if tuple(contract_l) != (lhs.ndim - 1,) or tuple(contract_r) != (0,) or batch != ((), ()):
    raise ValueError(f'unsupported dimension numbers {dimension_numbers}')
  lead = string.ascii_lowercase[:lhs.ndim - 1]
  return _mixed_einsum(f'{lead}y,yz->{lead}z', lhs, rhs, dtype)


def Dense(features: int, dtype: Any = jnp.float32, **kwargs) -> nn.Module:
  """`nn.Dense`; for a non-float32 dtype its products run in dtype and return float32."""
  if jnp.dtype(dtype) == jnp.float32:
    return nn.Dense(features, dtype=dtype, **kwargs)
  return nn.Dense(features, dtype=jnp.float32,
                  dot_general=functools.partial(_dense_dot_general, jnp.dtype(dtype)), **kwargs)
