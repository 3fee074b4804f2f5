"""The training loop in-process on a tiny run: early stopping and what it says."""
import json

import pytest

from cider_jax import train
from tests.helpers import runs


def _tiny_run(tmp_path, monkeypatch, **train_fields):
  """A 3-step-per-epoch run whose validation score is 0.5 after every epoch (never improves
  after the first); returns (console output, metrics.jsonl records)."""
  config = runs.small_config(tmp_path)
  config.train.batch_size = 16          # 48 train examples: 3 steps an epoch
  config.train.evaluate_at_end = False
  for k, v in train_fields.items():
    setattr(config.train, k, v)
  monkeypatch.setattr(train, 'selection_score', lambda v_full, config: 0.5)
  workdir = tmp_path / 'run'
  assert train.train_and_evaluate(config, str(workdir)) is None
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return records


@pytest.mark.parametrize('patience,min_epochs,stopped_after', [
    # epoch 1 is the best; epochs 2 and 3 bring nothing: patience 2 runs out
    pytest.param(2, 0, 3, marks=pytest.mark.slow),
    (2, 5, 5),   # the same, but not before epoch 5 (the default set's whole in-process run)
])
def test_a_run_that_never_improves_stops_where_configured_and_says_why(
    tmp_path, monkeypatch, capsys, patience, min_epochs, stopped_after):
  records = _tiny_run(tmp_path, monkeypatch, num_epochs=8, patience=patience,
                      min_epochs=min_epochs)
  out = capsys.readouterr().out
  epochs = [r for r in records if 'valid' in r]
  assert [r['epoch'] for r in epochs] == list(range(1, stopped_after + 1))
  assert all(r['step'] == 3 * r['epoch'] for r in epochs)
  (stop,) = [r for r in records if 'early_stop' in r]
  assert records[-1] is stop
  assert stop['early_stop'] == {'patience': patience, 'min_epochs': min_epochs,
                                'epoch': stopped_after, 'step': 3 * stopped_after,
                                'best_epoch': 1, 'best_score': 0.5}
  expected = (f'early stop after epoch {stopped_after} of 8: no new best validation score for '
              f'{stopped_after - 1} epochs (train.patience={patience}, '
              f'train.min_epochs={min_epochs}); best 0.5000 at epoch 1')
  assert stop['message'] == expected
  assert expected in out.splitlines()


@pytest.mark.slow
def test_a_run_that_trains_all_its_epochs_records_no_stop(tmp_path, monkeypatch):
  records = _tiny_run(tmp_path, monkeypatch, num_epochs=2, patience=1, min_epochs=0)
  # patience 1 would end it after epoch 2, which is its last epoch anyway: no early stop
  assert [r['epoch'] for r in records if 'valid' in r] == [1, 2]
  assert not [r for r in records if 'early_stop' in r]


@pytest.mark.slow
def test_max_steps_stop_names_the_setting(tmp_path, monkeypatch, capsys):
  records = _tiny_run(tmp_path, monkeypatch, num_epochs=8, patience=10, max_steps=4)
  (stop,) = [r for r in records if 'early_stop' in r]
  assert stop['early_stop'] == {'max_steps': 4, 'epoch': 2, 'step': 4, 'best_epoch': 1,
                                'best_score': 0.5}
  assert ('early stop after epoch 2 of 8: train.max_steps=4 reached at step 4; best 0.5000 at '
          'epoch 1') in capsys.readouterr().out
