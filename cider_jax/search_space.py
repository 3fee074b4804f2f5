"""The search space of a sweep: `config.sweep.space`, checked and sampled.

Each leaf of `config.sweep.space` names a config field by its path and gives its range:

  space.model.layers = ('int', 1, 4)               # 1, 2, 3, 4
  space.model.num_heads = ('choice', 1, 2, 4, 8)
  space.model.attn_dropout = ('float', 0.0, 0.5, 0.1)  # 0.0, 0.1, …, 0.5 (no step: continuous)

Bounds are inclusive. `parse(config)` turns it into `Param`s, or raises SearchSpaceError
naming the entry: a field the config does not have, an unknown kind, an empty range, or a value
the configuration itself rejects (`configuration.validate`, e.g. a head count that does not
divide model.embed_dim).
"""
import dataclasses
import math
import numbers
from typing import Any, Dict, List, Tuple

import ml_collections

from cider_jax import configuration

KINDS = ('int', 'float', 'choice')


class SearchSpaceError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Param:
  """One searched field: `name` is its dotted config path (also its Optuna parameter name)."""
  name: str
  kind: str        # 'int', 'float' or 'choice'
  args: Tuple      # (low, high, step or None) for 'int' / 'float'; the choices for 'choice'

  def candidates(self) -> List[Any]:
    """The values this parameter can take (a continuous float range: its two bounds)."""
    if self.kind == 'choice':
      return list(self.args)
    low, high, step = self.args
    if step is None:
      return [low] if low == high else [low, high]
    n = int(math.floor((high - low) / step + 1e-9)) + 1
    return [grid_value(low, step, k, self.kind) for k in range(n)]

  def contains(self, value) -> bool:
    """Whether `value` is one this parameter can take."""
    if self.kind == 'choice' or self.args[2] is not None:
      return value in self.candidates()
    return _is_number(value) and self.args[0] <= value <= self.args[1]

  def suggest(self, trial) -> Any:
    """The value of an Optuna trial (`trial.suggest_*`)."""
    if self.kind == 'choice':
      return trial.suggest_categorical(self.name, list(self.args))
    low, high, step = self.args
    if self.kind == 'int':
      return trial.suggest_int(self.name, low, high, step=step)
    return self.clean(trial.suggest_float(self.name, low, high, step=step))

  def clean(self, value):
    """A float grid value without the noise of low + k * step (0.30000000000000004)."""
    if self.kind == 'float' and self.args[2] is not None:
      return round(value, 10)
    return value


def grid_value(low, step, k, kind):
  return low + k * step if kind == 'int' else round(low + k * step, 10)


def _leaves(node, prefix='') -> List[Tuple[str, Any]]:
  out = []
  for key in sorted(node.keys()):
    value, name = node[key], f'{prefix}{key}'
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out += _leaves(value, name + '.')
    else:
      out.append((name, value))
  return out


def _is_int(v):
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v):
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def get_field(config, name: str):
  node = config
  for part in name.split('.'):
    node = node[part]
  return node


def set_field(config, name: str, value) -> None:
  *parents, last = name.split('.')
  node = config
  for part in parents:
    node = node[part]
  node[last] = value


def _param(config, name, spec) -> Param:
  where = f'config.sweep.space.{name}'
  form = ("('int', low, high[, step]), ('float', low, high[, step]) or "
          "('choice', value, ...)")
  try:
    current = get_field(config, name)
  except (KeyError, AttributeError, TypeError):
    raise SearchSpaceError(f'{where}: the config has no field {name!r} '
                           '(configs/default.py lists the fields)') from None
  if isinstance(current, ml_collections.ConfigDict):
    raise SearchSpaceError(f'{where}: {name!r} is a section of the config, not a field')
  if not isinstance(spec, (tuple, list)) or not spec or spec[0] not in KINDS:
    raise SearchSpaceError(f'{where} is {spec!r}; expected {form}')
  kind, args = spec[0], tuple(spec[1:])
  if kind == 'choice':
    if not args:
      raise SearchSpaceError(f'{where} is {spec!r}: an empty choice; expected at least one value')
    bad = [v for v in args if not isinstance(v, (bool, int, float, str))]
    if bad:
      raise SearchSpaceError(f'{where} is {spec!r}: {bad[0]!r} is not a number, bool or string')
    return Param(name, kind, args)
  if len(args) not in (2, 3):
    raise SearchSpaceError(f'{where} is {spec!r}; expected {form}')
  low, high, step = args[0], args[1], (args[2] if len(args) == 3 else None)
  if kind == 'int' and step is None:
    step = 1
  ok = _is_int if kind == 'int' else _is_number
  if not (ok(low) and ok(high) and (step is None or ok(step))):
    raise SearchSpaceError(f'{where} is {spec!r}: the bounds and step of an {kind!r} range must '
                           f'be {"integers" if kind == "int" else "numbers"}')
  if kind == 'int' and not _is_int(current):
    raise SearchSpaceError(f'{where} is {spec!r}: {name} holds {current!r}, not an integer; '
                           "use ('float', …) or ('choice', …)")
  if low > high:
    raise SearchSpaceError(f'{where} is {spec!r}: an empty range (low {low} > high {high})')
  if step is not None and step <= 0:
    raise SearchSpaceError(f'{where} is {spec!r}: the step must be > 0')
  return Param(name, kind, (low, high, step))


def parse(config) -> List[Param]:
  """The Params of `config.sweep.space`, each value of each checked on `config`."""
  space = config.sweep.space
  params = [_param(config, name, spec) for name, spec in _leaves(space)]
  if not params:
    raise SearchSpaceError('config.sweep.space is empty: nothing to search')
  for p in params:
    for value in p.candidates():
      trial = config.copy_and_resolve_references()
      try:
        set_field(trial, p.name, value)
        configuration.validate(trial, check_paths=False, check_devices=False)
      except (TypeError, configuration.ConfigError) as e:
        raise SearchSpaceError(f'config.sweep.space.{p.name} allows {value!r}, which the '
                               f'configuration rejects: {" ".join(str(e).split())}') from None
  return params


def values_of(params: List[Param], trial_params: Dict[str, Any]) -> Dict[str, Any]:
  """A trial's values as the trial's configuration holds them (`Param.clean`); parameters
  that are not in `params` (a search space changed since) are kept as they are."""
  by_name = {p.name: p for p in params}
  return {k: by_name[k].clean(v) if k in by_name else v for k, v in trial_params.items()}


def apply(config, values: Dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with the fields named in `values` set."""
  out = config.copy_and_resolve_references()
  for name, value in values.items():
    set_field(out, name, value)
  return out


def as_flags(values: Dict[str, Any]) -> List[str]:
  """['--config.model.layers=2', …]: the overrides that give a trial's configuration."""
  return [f'--config.{name}={value!r}' if isinstance(value, str) else
          f'--config.{name}={value}' for name, value in sorted(values.items())]
