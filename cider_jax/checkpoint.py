"""Checkpoints (orbax): `<workdir>/checkpoints/latest` (resume) and `…/best` (evaluation).

Each checkpoint holds the train state (params, optimizer state, step, RNG, and the constants
computed from the train split: prototypes, prior, bias-word table) and a JSON `meta` (config,
model spec, epoch, early-stopping state, data-iterator state, bias vocabulary, history).
Writes are atomic (orbax writes to a temporary directory and renames it), so a run killed
during a save never leaves a checkpoint that looks complete. Every process of a multi-host run
calls save and restore: orbax coordinates them.

The workdir is a local folder or a Cloud Storage URI (gs://BUCKET/PATH); the helpers at the
end read and write its other files (.npz arrays, PNG figures) through etils.epath.
"""
import dataclasses
import io
import json
import os
import sys
import tempfile
from typing import Any, Optional, Sequence, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cider_jax import spec as spec_lib


class CheckpointError(RuntimeError):
  pass


def _manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  # orbax wants an absolute local path; a gs:// URI goes through as it is
  return ocp.CheckpointManager(os.path.abspath(directory) if is_local(directory) else directory,
                               options=options)


class Checkpoints:
  """The run's two checkpoint series. `latest` keeps 2 so a damaged newest one has a fallback."""

  MAX_TO_KEEP = {'latest': 2, 'best': 1}

  def __init__(self, workdir: str):
    self.root = os.path.join(workdir, 'checkpoints')
    self.latest = _manager(os.path.join(self.root, 'latest'), self.MAX_TO_KEEP['latest'])
    self.best = _manager(os.path.join(self.root, 'best'), self.MAX_TO_KEEP['best'])

  def save(self, which: str, step: int, state, meta: dict):
    mgr = self._series(which)
    mgr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(jax.device_get(state)), meta=ocp.args.JsonSave(meta)))
    mgr.wait_until_finished()

  def meta_file(self, which: str, step: int) -> str:
    """The path of the JSON meta of checkpoint `step` of a series (orbax's layout)."""
    return os.path.join(self.root, which, str(step), 'meta', 'metadata')

  def read_meta(self, which: str, step: Optional[int] = None,
                required: Sequence[str] = ()) -> Optional[dict]:
    """The meta of checkpoint `step` (default: the newest) of a series, or None if the series
    has none. A meta file that is missing, not JSON, not a JSON object or without one of the
    `required` keys raises CheckpointError naming it and what to do."""
    mgr = self._series(which)
    step = mgr.latest_step() if step is None else step
    if step is None:
      return None
    try:
      meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except (FileNotFoundError, KeyError) as e:  # KeyError: orbax finds no 'meta' item
      raise self.damaged(which, step, 'is missing') from e
    except ValueError as e:  # json.JSONDecodeError: truncated or overwritten
      raise self.damaged(which, step, f'is not valid JSON ({" ".join(str(e).split())[:120]})') \
          from e
    if not isinstance(meta, dict):
      raise self.damaged(which, step, f'holds a JSON {type(meta).__name__}, not an object')
    missing = [k for k in required if k not in meta]
    if missing:
      raise self.damaged(which, step, f'has no {" and no ".join(map(repr, missing))}')
    return meta

  def damaged(self, which: str, step: int, problem: str) -> CheckpointError:
    """CheckpointError for checkpoint `step` of a series whose meta file has `problem`."""
    return CheckpointError(
        f'checkpoint {which}/{step} is damaged: {self.meta_file(which, step)} {problem}; '
        f'restore {os.path.join(self.root, which, str(step))} from a copy, or train the run '
        'again with a fresh --workdir')

  def restore(self, which: str, target, config=None,
              fields: Optional[Sequence[str]] = None) -> Optional[Tuple[Any, dict]]:
    """(state, meta) of the newest readable checkpoint of a series, or None if it has none.

    A damaged newest checkpoint gives a warning and the previous one is used. A checkpoint
    made with another configuration (shapes, classes) raises CheckpointError naming it.

    Args:
      which: 'latest' or 'best'.
      target: the TrainState to restore into: arrays (restored as such), or
        jax.ShapeDtypeStructs (restored as numpy arrays), e.g. `jax.eval_shape` of its
        construction, which allocates nothing.
      config: the run's configuration, checked against the checkpoint's (ARCH_FIELDS).
      fields: the TrainState fields to read, e.g. ('step', 'params'); None reads all. The
        others are not read: their leaves come back as `ocp.PLACEHOLDER`.
    """
    if fields is None:
      mgr, args = self._series(which), ocp.args.StandardRestore(target)
    else:
      # a manager of its own: the series' manager is bound to StandardRestore once it saved
      mgr = _manager(os.path.join(self.root, which), self.MAX_TO_KEEP[which])
      args = ocp.args.PyTreeRestore(_only(target, fields))
    errors = []
    for step in sorted(mgr.all_steps(), reverse=True):
      try:
        meta = self.read_meta(which, step)
      except Exception as e:  # truncated / corrupt
        errors.append(f'step {step}: {e}')
        print(f'warning: checkpoint {which}/{step} is unreadable ({type(e).__name__}); '
              'trying an older one', file=sys.stderr)
        continue
      if config is not None:
        check_compatible(meta, config)
      try:
        restored = mgr.restore(step, args=ocp.args.Composite(state=args))
      except Exception as e:
        if _is_shape_error(e):
          raise CheckpointError(f'checkpoint {which}/{step} in {self.root} does not fit this '
                                f'configuration: {e}') from e
        errors.append(f'step {step}: {e}')
        print(f'warning: checkpoint {which}/{step} is unreadable ({type(e).__name__}: '
              f'{str(e)[:200]}); trying an older one', file=sys.stderr)
        continue
      return restored['state'], meta
    if errors:
      raise CheckpointError(f'no readable {which} checkpoint in {self.root}: ' + '; '.join(errors))
    return None

  def _series(self, which: str) -> ocp.CheckpointManager:
    return self.latest if which == 'latest' else self.best


def _only(state, fields):
  """`state` (a TrainState) with the leaves of every field outside `fields` replaced by
  placeholders, which orbax neither reads nor allocates."""
  names = {f.name for f in dataclasses.fields(state)}
  unknown = set(fields) - names
  if unknown:
    raise ValueError(f'fields {sorted(unknown)} are not fields of {type(state).__name__} '
                     f'({", ".join(sorted(names))})')
  skip = lambda tree: jax.tree.map(lambda _: ocp.PLACEHOLDER, tree)
  return state.replace(**{name: skip(getattr(state, name)) for name in names
                          if name not in fields})


def _is_shape_error(e: Exception) -> bool:
  s = str(e).lower()
  return 'shape' in s and ('mismatch' in s or 'expected' in s or 'does not match' in s)


def spec_to_json(spec: spec_lib.ModelSpec) -> dict:
  return dataclasses.asdict(spec)


def spec_from_json(d: dict) -> spec_lib.ModelSpec:
  return spec_lib.ModelSpec(tuple(d['seq_lens']), tuple(d['feature_dims']), int(d['num_classes']),
                            bool(d['aligned']))


# fields whose change makes a checkpoint unusable for a configuration
ARCH_FIELDS = ('task', 'data.aligned', 'model.name', 'maci.enabled', 'model.embed_dim',
               'model.num_heads', 'model.layers', 'model.cross_dataset',
               'model.text_encoder.num_layers')


def _field(cfg: Any, dotted: str):
  for part in dotted.split('.'):
    cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
  return cfg


def check_compatible(meta: dict, config) -> None:
  saved = meta.get('config')
  if not saved:
    return
  for f in ARCH_FIELDS:
    try:
      a, b = _field(saved, f), _field(config, f)
    except (KeyError, AttributeError):
      continue
    if a != b:
      raise CheckpointError(f'the checkpoint was made with {f}={a!r}, the configuration has '
                            f'{f}={b!r}; use a fresh --workdir or the matching config')


def config_to_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


# ------------------------------------------------------------------------------ workdir files

def is_writer() -> bool:
  """Whether this process writes the workdir's files (checkpoints excepted): process 0."""
  return jax.process_index() == 0


def is_local(path) -> bool:
  """False for a URI such as gs://BUCKET/PATH, True for a path on this machine."""
  return '://' not in os.fspath(path)


def write_bytes(path, data: bytes) -> None:
  """`data` as the whole file at a local or gs:// path, never half-written: locally through a
  temporary file in the same folder, renamed over `path` once complete (a failed write leaves
  what was there before and no temporary file); an object store replaces objects whole."""
  if not is_local(path):
    epath.Path(path).write_bytes(data)
    return
  path = os.fspath(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_text(path, text: str) -> None:
  """`text` (UTF-8) as the whole file at `path`, as `write_bytes`."""
  write_bytes(path, text.encode('utf-8'))


def write_npz(path, arrays: dict, compressed: bool = False) -> None:
  """np.savez(_compressed) to a local or gs:// path, as `write_bytes`."""
  buf = io.BytesIO()
  (np.savez_compressed if compressed else np.savez)(buf, **arrays)
  write_bytes(path, buf.getvalue())


def read_npz(path) -> dict:
  """{name: array} of an .npz file on a local or gs:// path."""
  with epath.Path(path).open('rb') as f:
    buf = io.BytesIO(f.read())
  with np.load(buf, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def write_figure(fig, path, **savefig_kwargs) -> None:
  """fig.savefig to a local or gs:// path (the format from the file name's suffix)."""
  buf = io.BytesIO()
  fig.savefig(buf, format=epath.Path(path).suffix.lstrip('.') or 'png', **savefig_kwargs)
  write_bytes(path, buf.getvalue())
