"""Checks of a whole configuration, before any data is read or anything is compiled.

  configuration.validate(config)                     # values, devices and paths
  configuration.validate(config, check_paths=False)  # no files needed (the dry run)

The first impossible value raises `ConfigError`, one line naming the field, the value and what
is allowed, e.g.

  config.model.num_heads is 5; expected a divisor of model.embed_dim=32: 1, 2, 4, 8, 16 or 32

Only fields present in the config are checked, so a config with fewer fields still validates.
`parse_flags` is an absl flags parser for the launchers: a config file that cannot be loaded
(`--config configs/nope.py`) or an override of a field the config does not have
(`--config.train.no_such_key=1`) becomes one `error:` line and exit code 2; `--help` exits
with code 0.
"""
import importlib.util
import json
import numbers
import os
import sys
import tempfile

from absl import app, flags
from ml_collections import config_flags

from cider_jax.data import mmsa, synthetic
from cider_jax.data.validate import DataError

# jax, cider_jax.masks and cider_jax.models.bert (each over a second to import) are imported
# where they are used: the launchers parse and check their flags before loading JAX.

TASKS = ('binary', 'seven')
SOURCES = ('mmsa', 'synthetic')
DATASETS = ('mosi', 'mosei')
SETTINGS = ('iid', 'ood', 'cross_dataset')
POSITIONS = ('time', 'reference')
DTYPES = ('float32', 'bfloat16')
KERNELS = ('auto', 'native', 'xla')
MODEL_NAMES = ('cider', 'late_fusion', 'mag_bert')   # model.name: the base models (spec.py)
DROPOUTS = ('attn_dropout', 'out_dropout', 'embed_dropout', 'relu_dropout', 'res_dropout')

_MISSING = object()


class ConfigError(ValueError):
  """A configuration that cannot run. `field` is the dotted path ('model.num_heads')."""

  def __init__(self, message: str, *, field: str = None, value=None):
    super().__init__(message)
    self.field, self.value = field, value


def _fail(field, value, expected):
  raise ConfigError(f'config.{field} is {value!r}; expected {expected}', field=field,
                    value=value)


def _get(config, field, default=_MISSING):
  node = config
  for part in field.split('.'):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return default
  return node


def _is_int(v):
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v):
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _one_of(config, field, options):
  v = _get(config, field)
  if v is not _MISSING and v not in options:
    _fail(field, v, 'one of ' + ', '.join(repr(o) for o in options))
  return v


def _integer(config, field, minimum, note=''):
  v = _get(config, field)
  if v is not _MISSING and not (_is_int(v) and v >= minimum):
    what = 'a positive integer' if minimum == 1 else f'an integer >= {minimum}'
    _fail(field, v, what + note)
  return v


def _in_range(v, lo, hi, hi_open):
  return _is_number(v) and lo <= v and (v < hi if hi_open else v <= hi)


def _fraction(config, field, hi_open, what):
  v = _get(config, field)
  if v is not _MISSING and not _in_range(v, 0, 1, hi_open):
    _fail(field, v, what + (' in [0, 1)' if hi_open else ' in [0, 1]'))
  return v


def _positive(config, field, strict, what='a number', note=''):
  v = _get(config, field)
  if v is _MISSING:
    return v
  ok = _is_number(v) and (v > 0 if strict else v >= 0) and v != float('inf')
  if not ok:
    _fail(field, v, f'{what} {"> 0" if strict else ">= 0"}{note}')
  return v


# ------------------------------------------------------------------------------ sections

def _check_data(config):
  _one_of(config, 'task', TASKS)
  source = _one_of(config, 'data.source', SOURCES)
  _one_of(config, 'data.dataset', DATASETS)
  setting = _one_of(config, 'data.setting', SETTINGS)
  aligned = _get(config, 'data.aligned')
  if source == 'mmsa' and setting == 'cross_dataset' and not aligned:
    _fail('data.aligned', aligned, 'True with data.setting=cross_dataset '
          '(MSA_cross_datasets holds aligned features only)')
  if source == 'synthetic' and _get(config, 'data.synthetic') is not _MISSING:
    try:
      synthetic.synthetic_params(config)
    except DataError as e:  # 'config.data.synthetic.<field> is …; expected …'
      field = str(e).split()[0][len('config.'):].rstrip(':')
      raise ConfigError(str(e), field=field) from None


def _check_model(config):
  _one_of(config, 'model.name', MODEL_NAMES)
  embed = _integer(config, 'model.embed_dim', 1)
  heads = _integer(config, 'model.num_heads', 1)
  if _is_int(embed) and _is_int(heads) and embed % heads:
    divisors = [d for d in range(1, embed + 1) if embed % d == 0]
    listed = (', '.join(map(str, divisors[:-1])) + f' or {divisors[-1]}' if len(divisors) < 16
              else 'a number dividing it')
    _fail('model.num_heads', heads, f'a divisor of model.embed_dim={embed}: {listed}')
  _integer(config, 'model.layers', 1)
  _integer(config, 'model.text_encoder.num_layers', 0, ' (0: all layers)')
  for name in DROPOUTS:
    _fraction(config, f'model.{name}', hi_open=True, what='a dropout rate')
  _one_of(config, 'model.positions', POSITIONS)
  _one_of(config, 'model.dtype', DTYPES)
  _one_of(config, 'model.kernels', KERNELS)
  _one_of(config, 'model.text_encoder.pooling', ('auto', 'cls', 'mean'))


def _check_training(config, check_devices):
  for name in ('w_rep', 'w_attn', 'w_rec'):
    _positive(config, f'loss.{name}', strict=False, what='a finite loss weight')
  _positive(config, 'optim.lr', strict=True, what='a learning rate')
  _positive(config, 'optim.bert_lr', strict=True, what='a learning rate')
  _positive(config, 'optim.bert_weight_decay', strict=False)
  _fraction(config, 'optim.b1', hi_open=True, what='an Adam decay rate')
  _fraction(config, 'optim.b2', hi_open=True, what='an Adam decay rate')
  _positive(config, 'optim.eps', strict=True, what='an Adam epsilon',
            note=' (0 divides by zero where a gradient is 0)')
  _positive(config, 'optim.grad_clip', strict=False, what='a clipping norm', note=' (0: off)')
  _one_of(config, 'optim.schedule', ('constant', 'linear_tail'))
  _fraction(config, 'optim.decay_start', hi_open=True, what='a fraction of the run')
  factor = _get(config, 'optim.final_factor')
  if factor is not _MISSING and not _in_range(factor, 0, 1, hi_open=False) or factor == 0:
    _fail('optim.final_factor', factor, 'a factor in (0, 1]')
  batch = _integer(config, 'train.batch_size', 1)
  if check_devices and _is_int(batch):
    import jax  # pylint: disable=g-import-not-at-top
    n = jax.device_count()  # the same count as train.train_and_evaluate's parallel.check_batch
    if batch % n:
      _fail('train.batch_size', batch, f'a positive multiple of the number of devices ({n})')
  _integer(config, 'train.eval_batch_size', 1)
  _integer(config, 'train.num_epochs', 1)
  _integer(config, 'train.patience', 0)
  _integer(config, 'train.min_epochs', 0)
  _one_of(config, 'train.select_on', ('auto', 'factual', 'debiased'))
  _integer(config, 'train.max_steps', 0, ' (0: no limit)')
  _integer(config, 'train.log_every', 1)


def selection_rule(select_on: str, maci_enabled: bool) -> str:
  """'debiased' or 'factual': the prediction whose validation score picks the best checkpoint
  (train.select_on; 'auto': the debiased one when the model has MACI)."""
  if select_on == 'auto':
    return 'debiased' if maci_enabled else 'factual'
  return select_on


def _check_maci_and_eval(config):
  _one_of(config, 'maci.enabled', (True, False))
  if _get(config, 'train.select_on') == 'debiased' and _get(config, 'maci.enabled') is False:
    _fail('train.select_on', 'debiased', "'auto' or 'factual' (maci.enabled=False has no "
          'debiased prediction)')
  _integer(config, 'maci.top_k', 0)
  _positive(config, 'maci.cv_threshold', strict=False)
  _positive(config, 'maci.train_tau', strict=False, what='a counterfactual strength')
  grid = _get(config, 'maci.tau_grid')
  if grid is not _MISSING:
    ok = (isinstance(grid, (tuple, list)) and len(grid) == 3 and all(map(_is_number, grid))
          and 0 <= grid[0] <= grid[1] and grid[2] > 0)
    if not ok:
      _fail('maci.tau_grid', grid, '(start, stop, step) with 0 <= start <= stop and step > 0')
  aligned = _get(config, 'data.aligned')
  modes = _get(config, 'eval.modes')
  if modes is not _MISSING:
    if isinstance(modes, str):
      modes = (modes,)
    for i, mode in enumerate(modes):
      from cider_jax import masks  # pylint: disable=g-import-not-at-top
      try:
        masks.check_mode(mode, aligned=aligned is _MISSING or bool(aligned))
      except ValueError as e:
        raise ConfigError(f'config.eval.modes[{i}] is {mode!r}: {e}', field=f'eval.modes[{i}]',
                          value=mode) from None
  rates = _get(config, 'eval.rates')
  if rates is not _MISSING:
    if _is_number(rates):
      rates = (rates,)
    for i, rate in enumerate(rates):
      if not _in_range(rate, 0, 1, hi_open=False):
        _fail(f'eval.rates[{i}]', rate, 'a missing rate in [0, 1]')
  _fraction(config, 'eval.valid_rate', hi_open=False, what='a missing rate')
  _integer(config, 'distributed.num_processes', 0, ' (0: from the environment)')
  _integer(config, 'distributed.process_id', -1, ' (-1: from the environment)')


# ------------------------------------------------------------------------------ paths

def _check_data_paths(config):
  if _get(config, 'data.source') != 'mmsa' or _get(config, 'data') is _MISSING:
    return
  field = 'data.file' if _get(config, 'data.file') else 'data.dir'
  value = _get(config, field)
  kind = 'aligned' if _get(config, 'data.aligned', False) else 'unaligned'
  what = (f"MMSA data file for {_get(config, 'data.dataset', 'mosi')} {kind} "
          f"({_get(config, 'data.setting', 'iid')})")
  try:
    paths = mmsa.resolve_split_paths(config.data, _get(config, 'task', 'binary'))
    for path in sorted(set(paths.values())):
      mmsa.require_file(path, what)
  except DataError as e:
    message = str(e)
    if not message.startswith('config.'):
      message = f'config.{field} is {value!r}: {message}'
    raise ConfigError(message, field=field, value=value) from None


def _check_text_encoder(config):
  from cider_jax.models.bert import PACKAGE_PREFIX  # pylint: disable=g-import-not-at-top
  path = _get(config, 'model.text_encoder.path')
  if not isinstance(path, str) or path.startswith(PACKAGE_PREFIX):
    return
  field = 'model.text_encoder.path'
  expected = ('a folder holding a Hugging Face BERT (config.json, model.safetensors, vocab.txt), '
              'e.g. bert-base-uncased')
  if not os.path.isdir(path):
    _fail(field, path, f'{expected}; there is no such folder')
  missing = [f for f in ('config.json', 'model.safetensors')
             if not os.path.isfile(os.path.join(path, f))]
  if missing:
    _fail(field, path, f'{expected}; it has no {" and no ".join(missing)}')
  layers = _get(config, 'model.text_encoder.num_layers')
  try:
    with open(os.path.join(path, 'config.json')) as f:
      available = int(json.load(f)['num_hidden_layers'])
  except (OSError, ValueError, KeyError, TypeError):
    return  # unreadable: cider_jax.models.bert says why when it loads the folder
  if _is_int(layers) and layers > available:
    _fail('model.text_encoder.num_layers', layers,
          f'at most {available}, the layers of the text encoder at {path!r} (0: all)')


# ------------------------------------------------------------------------------ entry points

def validate(config, *, workdir=None, check_paths: bool = True,
             check_devices: bool = True) -> None:
  """Raises ConfigError for the first impossible value of `config`; returns None otherwise.

  workdir: also check that the run's workdir can be reached (`check_workdir`).
  check_paths: also require the files a run reads (MMSA pickles for data.source=mmsa, the
    text encoder folder unless it is a `package:` path); off for the dry run.
  check_devices: require train.batch_size to be a multiple of jax.device_count(); off for
    evaluation, which may run on other devices than training did.
  """
  _check_data(config)
  _check_model(config)
  _check_training(config, check_devices)
  _check_maci_and_eval(config)
  if check_paths:
    _check_data_paths(config)
    _check_text_encoder(config)
  if workdir is not None:
    check_workdir(workdir)


def check_workdir(workdir) -> None:
  """A local workdir must be a folder, or a path where one can be made; a URI workdir (gs://…)
  needs its fsspec filesystem: gcsfs for gs:// (requirements-gcs.txt)."""
  workdir = str(workdir)
  if '://' not in workdir:
    _check_local_workdir(workdir)
    return
  scheme = workdir.split('://', 1)[0]
  needs = {'gs': 'gcsfs', 's3': 's3fs'}.get(scheme)
  if needs is None:
    raise ConfigError(f'workdir {workdir!r}: unsupported scheme {scheme}://; use a local path '
                      'or gs://BUCKET/PATH', field='workdir', value=workdir)
  if importlib.util.find_spec(needs) is None:
    raise ConfigError(f'workdir {workdir!r} needs the {needs} package, which is not installed: '
                      'pip install -r requirements-gcs.txt', field='workdir', value=workdir)


def _check_local_workdir(workdir: str) -> None:
  """ConfigError unless `workdir` is a folder this process can write in, or can be made:
  checked before any work, so a run never fails at its first save."""
  def fail(problem):
    raise ConfigError(f'workdir {workdir!r} {problem}; choose another --workdir',
                      field='workdir', value=workdir)

  path = os.path.abspath(workdir)
  existing = path  # the workdir, or the nearest folder above it that exists
  while not os.path.exists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    fail('is a file, not a directory' if existing == path else
         f'is under {existing}, which is a file, not a directory')
  try:  # what a run does first: make a folder there (removed at once)
    os.rmdir(tempfile.mkdtemp(dir=existing, prefix='.cider_jax_check_'))
  except OSError as e:
    fail(f'cannot be written ({e.strerror or e})' if existing == path else
         f'cannot be made: no folder can be created in {existing} ({e.strerror or e})')


# absl's help flags: each prints the help and exits with code 1 (0 here)
_HELP_FLAGS = ('help', '?', 'helpshort', 'helpfull', 'helpxml')


def _help_asked(argv):
  """The help flag of argv (e.g. '--helpfull'), or None when no help is asked for."""
  for arg in argv[1:]:
    if arg == '--':
      break
    if not arg.startswith('-'):
      continue
    name, eq, value = arg.lstrip('-').partition('=')
    if name in _HELP_FLAGS and (not eq or value.lower() in ('true', 't', '1')):
      return arg
  return None


def _config_flags() -> list:
  """The names of the config-file flags the launcher defines ('config')."""
  names = []
  for name in flags.FLAGS:
    try:
      config_flags.get_config_filename(flags.FLAGS[name])
    except TypeError:  # not a config flag
      continue
    except flags.Error:  # a config flag not parsed yet
      pass
    names.append(name)
  return names


def _config_arg(argv, name):
  """The value of --NAME in argv (the last one), or None when it is not given."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == '--':
      break
    if arg in (f'--{name}', f'-{name}') and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith((f'--{name}=', f'-{name}=')):
      value = arg.split('=', 1)[1]
  return value


def _config_load_error(argv, error: OSError) -> str:
  """The `error:` line for a config file that could not be loaded."""
  problem = ' '.join(str(error).split())
  names = _config_flags() or ['config']
  for name in names:
    path = _config_arg(argv, name)
    if path is None:
      continue
    file = path.split(':', 1)[0]
    if not os.path.exists(file):
      problem = 'no such file'
    elif os.path.isdir(file):
      problem = 'a directory, not a config file'
    return (f'error: --{name} {path}: {problem}; give a config file such as '
            'configs/quickstart.py (configs/*.py)')
  return (f'error: --{names[0]}: the config file cannot be loaded ({problem}); give a config '
          'file such as configs/quickstart.py (configs/*.py)')


def _load_failure(value):
  """The OSError of a config flag whose file could not be loaded (ml_collections keeps it for
  the value's first use), or None."""
  try:
    getattr(value, 'lock', None)
  except OSError as e:
    return e
  return None


def parse_flags(argv):
  """absl flags parser (`app.run(main, flags_parser=parse_flags)`): as absl's own, but
  - --help (--helpfull, --helpshort, -?, --helpxml) prints the help and exits with code 0;
  - a config file that cannot be loaded (--config configs/nope.py), or an override naming a
    field the config lacks (--config.train.no_such_key=1), prints one `error:` line and exits
    with code 2."""
  asked = _help_asked(argv)
  if asked:  # absl prints the help while parsing this flag, then exits with code 1
    try:
      app.parse_flags_with_usage([argv[0], asked])
    except SystemExit as e:
      sys.exit(0 if e.code == 1 else e.code)
    sys.exit(0)
  try:
    rest = app.parse_flags_with_usage(argv)
  except OSError as e:  # the config file could not be loaded, met by an override
    print(_config_load_error(argv, e), file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError) as e:
    detail = e.args[0] if e.args else e
    while isinstance(detail, BaseException) and detail.args:
      detail = detail.args[0]
    lines = str(detail).split('\n')
    key = lines[0].strip('\'"')
    overrides = [a.split('=', 1)[0] for a in argv[1:] if a.startswith('--config.')]
    named = [a for a in overrides if key in a[len('--'):].split('.')]
    if not named:  # not an override's fault (e.g. a bug in the config file): as it was
      raise
    hint = f' ({" ".join(lines[1:]).strip()})' if len(lines) > 1 else ''
    print(f'error: {named[0]}: the config has no field {key!r}{hint}; '
          'configs/default.py lists the fields', file=sys.stderr)
    sys.exit(2)
  for name in _config_flags():
    error = _load_failure(flags.FLAGS[name].value)
    if error is not None:
      print(_config_load_error(argv, error), file=sys.stderr)
      sys.exit(2)
  return rest
