"""Checkpoint faults: a damaged newest checkpoint falls back, another configuration is refused."""
import glob
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cider_jax import checkpoint as ckpt_lib
from cider_jax import run_state
from tests.helpers import tiny


@pytest.fixture(scope='module')
def state():
  return run_state.init_state(tiny.config(), tiny.SPEC, tiny.TINY_BERT, tiny.consts())[3]


def _meta(config, step):
  return {'epoch': step, 'config': ckpt_lib.config_to_dict(config),
          'spec': ckpt_lib.spec_to_json(tiny.SPEC)}


def test_damaged_latest_falls_back_to_the_previous_one(tmp_path, state, capsys):
  config = tiny.config()
  ck = ckpt_lib.Checkpoints(str(tmp_path))
  older = state.replace(step=state.step + 5)
  newer = state.replace(step=state.step + 9)
  ck.save('latest', 5, older, _meta(config, 5))
  ck.save('latest', 9, newer, _meta(config, 9))
  # damage every array file of the newest checkpoint
  files = [f for f in glob.glob(str(tmp_path / 'checkpoints/latest/9/state/**/*'), recursive=True)
           if os.path.isfile(f) and os.path.getsize(f) > 0]
  assert files
  for f in files:
    with open(f, 'r+b') as fh:
      fh.truncate(max(1, os.path.getsize(f) // 3))
  restored, meta = ckpt_lib.Checkpoints(str(tmp_path)).restore('latest', state, config)
  assert int(restored.step) == 5 and meta['epoch'] == 5
  assert 'checkpoint latest/9 is unreadable' in capsys.readouterr().err


def test_checkpoint_of_another_configuration_is_refused(tmp_path, state):
  config = tiny.config()
  ck = ckpt_lib.Checkpoints(str(tmp_path))
  ck.save('latest', 1, state, _meta(config, 1))
  other = tiny.config()
  other.model.num_heads = 8
  with pytest.raises(ckpt_lib.CheckpointError, match='model.num_heads=4.*model.num_heads=8'):
    ck.restore('latest', state, other)


def test_round_trip_is_exact(tmp_path, state):
  config = tiny.config()
  ck = ckpt_lib.Checkpoints(str(tmp_path))
  ck.save('best', 3, state, _meta(config, 3))
  restored, _ = ck.restore('best', state, config)
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)


def test_no_checkpoint_gives_none(tmp_path, state):
  assert ckpt_lib.Checkpoints(str(tmp_path)).restore('latest', state, tiny.config()) is None


def test_save_killed_midway_leaves_no_checkpoint(tmp_path, state, capsys):
  """A kill during a save leaves orbax's temporary folder (step.orbax-checkpoint-tmp-…) with
  part of the files; it is not a checkpoint: the previous one is restored, without a warning."""
  import shutil
  config = tiny.config()
  ck = ckpt_lib.Checkpoints(str(tmp_path))
  ck.save('latest', 5, state.replace(step=state.step + 5), _meta(config, 5))
  root = tmp_path / 'checkpoints' / 'latest'
  partial = root / '9.orbax-checkpoint-tmp-1700000000'
  shutil.copytree(root / '5', partial)
  files = sorted(p for p in partial.rglob('*') if p.is_file())
  for p in files[len(files) // 2:]:  # the save stopped half-way
    p.unlink()
  fresh = ckpt_lib.Checkpoints(str(tmp_path))
  assert list(fresh.latest.all_steps()) == [5]
  restored, meta = fresh.restore('latest', state, config)
  assert int(restored.step) == 5 and meta['epoch'] == 5
  assert 'unreadable' not in capsys.readouterr().err


def test_params_only_restore_matches_the_full_restore(tmp_path, state):
  """Evaluation's restore reads the parameters (and step) into an abstract target: the same
  arrays as a full restore, no optimizer state read, no device array allocated."""
  config = tiny.config()
  ckpt_lib.Checkpoints(str(tmp_path)).save('best', 3, state.replace(step=state.step + 3),
                                           _meta(config, 3))
  full, _ = ckpt_lib.Checkpoints(str(tmp_path)).restore('best', state, config)
  consts = jax.eval_shape(tiny.consts)
  _, target = run_state.abstract_state(config, tiny.SPEC, tiny.TINY_BERT, consts)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(target))
  live = len(jax.live_arrays())
  restored = run_state.restore_params(ckpt_lib.Checkpoints(str(tmp_path)), 'best', config,
                                      tiny.SPEC, tiny.TINY_BERT, consts)
  assert len(jax.live_arrays()) == live
  assert restored.step == int(full.step) == 3
  assert jax.tree.structure(restored.params) == jax.tree.structure(full.params)
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(full.params)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  partial, _ = ckpt_lib.Checkpoints(str(tmp_path)).restore('best', target, config,
                                                           fields=('step', 'params'))
  skipped = jax.tree.leaves((partial.opt_state, partial.rng, partial.consts))
  assert skipped and all(x is ocp.PLACEHOLDER for x in skipped)


def test_write_bytes_replaces_a_file_whole_or_not_at_all(tmp_path, monkeypatch):
  """A file written by checkpoint.write_text is the new text once the call returns; a write
  that fails (here the rename, as a full disk or a kill before it would) leaves the previous
  file as it was and no temporary file."""
  path = tmp_path / 'report.json'
  ckpt_lib.write_text(path, 'old')
  assert path.read_text() == 'old'
  ckpt_lib.write_text(path, 'new ✓')
  assert path.read_text(encoding='utf-8') == 'new ✓'

  def failing_replace(src, dst):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(ckpt_lib.os, 'replace', failing_replace)
  with pytest.raises(OSError, match='No space left'):
    ckpt_lib.write_text(path, 'newer')
  assert path.read_text(encoding='utf-8') == 'new ✓'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['report.json']
