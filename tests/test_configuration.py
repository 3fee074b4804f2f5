"""Configuration checks: every impossible value is refused at start-up with its field named."""
import glob
import importlib
import json
import os
import subprocess
import sys

import pytest

from cider_jax import configuration
from cider_jax.configuration import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.splitext(os.path.basename(p))[0]
                 for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if not p.endswith('__init__.py'))


def _config(name='quickstart', **overrides):
  sys.path.insert(0, ROOT)
  config = importlib.import_module(f'configs.{name}').get_config()
  for field, value in overrides.items():
    *parents, leaf = field.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


# (overrides, the field the message names, a further part of the message)
REFUSED = {
    'task': ({'task': 'three'}, 'task', "'binary', 'seven'"),
    'source': ({'data.source': 'csv'}, 'data.source', "'mmsa', 'synthetic'"),
    'dataset': ({'data.dataset': 'iemocap'}, 'data.dataset', "'mosi', 'mosei'"),
    'setting': ({'data.setting': 'cross'}, 'data.setting', "'iid', 'ood', 'cross_dataset'"),
    'cross_dataset_unaligned': ({'data.source': 'mmsa', 'data.setting': 'cross_dataset'},
                                'data.aligned', 'aligned features only'),
    'synthetic_text_len': ({'data.synthetic.text_len': 5}, 'data.synthetic.text_len', '>= 12'),
    'heads_not_dividing_32': ({'model.num_heads': 5}, 'model.num_heads',
                              'divisor of model.embed_dim=32'),
    'zero_heads': ({'model.num_heads': 0}, 'model.num_heads', 'positive integer'),
    'zero_embed_dim': ({'model.embed_dim': 0}, 'model.embed_dim', 'positive integer'),
    'zero_layers': ({'model.layers': 0}, 'model.layers', 'positive integer'),
    'negative_text_layers': ({'model.text_encoder.num_layers': -1},
                             'model.text_encoder.num_layers', '>= 0'),
    'attn_dropout_one': ({'model.attn_dropout': 1.0}, 'model.attn_dropout', '[0, 1)'),
    'out_dropout_one': ({'model.out_dropout': 1.0}, 'model.out_dropout', '[0, 1)'),
    'embed_dropout_one': ({'model.embed_dropout': 1.0}, 'model.embed_dropout', '[0, 1)'),
    'relu_dropout_one': ({'model.relu_dropout': 1.5}, 'model.relu_dropout', '[0, 1)'),
    'res_dropout_negative': ({'model.res_dropout': -0.1}, 'model.res_dropout', '[0, 1)'),
    'positions': ({'model.positions': 'batch'}, 'model.positions', "'time', 'reference'"),
    'dtype': ({'model.dtype': 'float16'}, 'model.dtype', "'float32', 'bfloat16'"),
    'loss_weight': ({'loss.w_rec': -0.6}, 'loss.w_rec', '>= 0'),
    'lr_zero': ({'optim.lr': 0.0}, 'optim.lr', '> 0'),
    'lr_nan': ({'optim.lr': float('nan')}, 'optim.lr', '> 0'),
    'bert_lr_negative': ({'optim.bert_lr': -5e-5}, 'optim.bert_lr', '> 0'),
    'adam_b1': ({'optim.b1': 1.0}, 'optim.b1', '[0, 1)'),
    'adam_eps': ({'optim.eps': 0.0}, 'optim.eps', '> 0'),
    'grad_clip': ({'optim.grad_clip': -1.0}, 'optim.grad_clip', '>= 0'),
    'batch_zero': ({'train.batch_size': 0}, 'train.batch_size', 'positive integer'),
    'eval_batch_zero': ({'train.eval_batch_size': 0}, 'train.eval_batch_size', 'positive'),
    'epochs_zero': ({'train.num_epochs': 0}, 'train.num_epochs', 'positive integer'),
    'patience_negative': ({'train.patience': -1}, 'train.patience', '>= 0'),
    'max_steps_negative': ({'train.max_steps': -1}, 'train.max_steps', '>= 0'),
    'log_every_zero': ({'train.log_every': 0}, 'train.log_every', 'positive integer'),
    'top_k_negative': ({'maci.top_k': -1}, 'maci.top_k', '>= 0'),
    'tau_grid_negative': ({'maci.tau_grid': (-1.0, 3.0, 0.1)}, 'maci.tau_grid', '0 <= start'),
    'tau_grid_step_zero': ({'maci.tau_grid': (0.0, 3.0, 0.0)}, 'maci.tau_grid', 'step > 0'),
    'tau_grid_reversed': ({'maci.tau_grid': (3.0, 0.0, 0.1)}, 'maci.tau_grid', 'start <= stop'),
    'rate_above_one': ({'eval.rates': (0.0, 1.5)}, 'eval.rates[1]', '[0, 1]'),
    'rate_negative': ({'eval.rates': (-0.1, 0.5)}, 'eval.rates[0]', '[0, 1]'),
    'valid_rate_negative': ({'eval.valid_rate': -0.5}, 'eval.valid_rate', '[0, 1]'),
    'unknown_mode': ({'eval.modes': ('RMFM', 'XYZ')}, 'eval.modes[1]', 'RMFM, RMFM_same, RMM'),
    'tmfm_unaligned': ({'eval.modes': ('TMFM',)}, 'eval.modes[0]', 'word-aligned'),
    'stmfm_unaligned': ({'eval.modes': ('RMM', 'STMFM')}, 'eval.modes[1]', 'word-aligned'),
    'process_id': ({'distributed.process_id': -2}, 'distributed.process_id', '>= -1'),
}


@pytest.mark.parametrize('overrides,field,expected', REFUSED.values(), ids=list(REFUSED))
def test_impossible_value_is_refused_naming_the_field(overrides, field, expected):
  config = _config(**overrides)
  with pytest.raises(ConfigError) as info:
    configuration.validate(config, check_paths=False)
  message = str(info.value)
  assert message.startswith(f'config.{field} is ')
  assert expected in message
  assert info.value.field.startswith(field.split('[')[0])
  assert '\n' not in message


def test_batch_not_a_multiple_of_the_devices(monkeypatch):
  import jax
  monkeypatch.setattr(jax, 'device_count', lambda: 4)
  with pytest.raises(ConfigError, match=r'config.train.batch_size is 6; expected a positive '
                     r'multiple of the number of devices \(4\)'):
    configuration.validate(_config(**{'train.batch_size': 6}), check_paths=False)
  configuration.validate(_config(**{'train.batch_size': 8}), check_paths=False)
  configuration.validate(_config(**{'train.batch_size': 6}), check_paths=False,
                         check_devices=False)


def test_aligned_data_allows_tmfm_and_stmfm():
  modes = {'eval.modes': ('TMFM', 'STMFM', 'RMFM')}
  configuration.validate(_config(**modes, **{'data.aligned': True}), check_paths=False)
  # the same modes on unaligned data: the first word-aligned mode is refused
  with pytest.raises(ConfigError) as info:
    configuration.validate(_config(**modes, **{'data.aligned': False}), check_paths=False)
  assert info.value.field == 'eval.modes[0]'


@pytest.mark.parametrize('name', CONFIGS)
def test_every_shipped_config_is_valid(name):
  config = _config(name)
  needs_user_files = (config.data.source == 'mmsa' or
                      not config.model.text_encoder.path.startswith('package:'))
  configuration.validate(config, check_paths=not needs_user_files)
  # each config is the setting its docstring and the README name
  source, dataset, task, aligned, setting = SHIPPED[name]
  assert (config.data.source, config.data.dataset, config.task, config.data.aligned,
          config.data.setting) == (source, dataset, task, aligned, setting)
  assert config.model.cross_dataset == (setting == 'cross_dataset')
  if name != 'quickstart':  # the published hyper-parameters (docs/model.md §4)
    m, t = config.model, config.train
    assert (m.layers, m.num_heads, m.attn_dropout, m.out_dropout, m.embed_dropout,
            m.relu_dropout, m.res_dropout) == (3, 8, 0.0, 0.3, 0.2, 0.1, 0.1)
    assert (config.loss.w_rep, config.loss.w_attn, config.loss.w_rec) == (0.5, 0.1, 0.6)
    assert (t.batch_size, t.num_epochs, t.patience) == (128, 200, 10)


# config: (data.source, data.dataset, task, data.aligned, data.setting)
SHIPPED = {
    'default': ('mmsa', 'mosi', 'binary', False, 'iid'),
    'rmfm': ('mmsa', 'mosi', 'binary', False, 'iid'),
    'rmfm_seven': ('mmsa', 'mosi', 'seven', False, 'iid'),
    'mosi_aligned': ('mmsa', 'mosi', 'binary', True, 'iid'),
    'mosei': ('mmsa', 'mosei', 'binary', False, 'iid'),
    'mosei_seven': ('mmsa', 'mosei', 'seven', False, 'iid'),
    'cross_dataset': ('mmsa', 'mosi', 'binary', True, 'cross_dataset'),
    'ood': ('mmsa', 'mosi', 'binary', False, 'ood'),
    'ood_seven': ('mmsa', 'mosi', 'seven', False, 'ood'),
    'quickstart': ('synthetic', 'mosi', 'binary', False, 'iid'),
}


def test_every_shipped_config_is_listed():
  assert sorted(SHIPPED) == CONFIGS


# ---------------------------------------------------------------------------- paths

def _bert_folder(path, files=('config.json', 'model.safetensors'), layers=12):
  os.makedirs(path, exist_ok=True)
  for f in files:
    with open(os.path.join(path, f), 'w') as out:
      out.write(json.dumps({'num_hidden_layers': layers}) if f == 'config.json' else '')
  return str(path)


def _mmsa_config(tmp_path, **overrides):
  overrides = {'model.text_encoder.path': _bert_folder(tmp_path / 'bert'), **overrides}
  return _config('rmfm', **overrides)


def test_data_dir_empty(tmp_path):
  with pytest.raises(ConfigError, match='config.data.dir is empty: set --config.data.dir'):
    configuration.validate(_mmsa_config(tmp_path))


@pytest.mark.parametrize('setting,layout', [
    ('iid', 'CMU-MOSI/Processed/unaligned_50.pkl'),
    ('ood', 'OOD_MOSI/binary/MOSI_unaligned_50.pkl'),
])
def test_data_dir_without_the_pickle_names_the_layout(tmp_path, setting, layout):
  config = _mmsa_config(tmp_path, **{'data.dir': str(tmp_path / 'data'),
                                     'data.setting': setting})
  with pytest.raises(ConfigError) as info:
    configuration.validate(config)
  message = str(info.value)
  assert message.startswith(f"config.data.dir is '{tmp_path / 'data'}': MMSA data file")
  assert layout in message and 'Put the MMSA pickle there' in message
  assert info.value.field == 'data.dir'


def test_data_file_missing(tmp_path):
  config = _mmsa_config(tmp_path, **{'data.file': str(tmp_path / 'mosi.pkl')})
  with pytest.raises(ConfigError, match=r"config.data.file is '.*mosi.pkl': MMSA data file"):
    configuration.validate(config)


def _with_data(tmp_path, **overrides):
  pickle = tmp_path / 'data' / 'CMU-MOSI' / 'Processed' / 'unaligned_50.pkl'
  pickle.parent.mkdir(parents=True)
  pickle.write_bytes(b'')
  return _mmsa_config(tmp_path, **{'data.dir': str(tmp_path / 'data'), **overrides})


def test_present_files_pass(tmp_path):
  config = _with_data(tmp_path)
  configuration.validate(config)
  # the same configuration once the pickle is gone: refused, naming data.dir
  os.remove(tmp_path / 'data' / 'CMU-MOSI' / 'Processed' / 'unaligned_50.pkl')
  with pytest.raises(ConfigError) as info:
    configuration.validate(config)
  assert info.value.field == 'data.dir'


def test_text_encoder_folder_missing(tmp_path):
  config = _with_data(tmp_path, **{'model.text_encoder.path': str(tmp_path / 'nowhere')})
  with pytest.raises(ConfigError, match=r"config.model.text_encoder.path is '.*nowhere'; "
                     r'expected a folder holding a Hugging Face BERT .*no such folder'):
    configuration.validate(config)
  configuration.validate(config, check_paths=False)


def test_text_encoder_without_weights(tmp_path):
  folder = _bert_folder(tmp_path / 'half', files=('config.json',))
  config = _with_data(tmp_path, **{'model.text_encoder.path': folder})
  with pytest.raises(ConfigError, match='config.model.text_encoder.path .* has no '
                     'model.safetensors'):
    configuration.validate(config)


def test_more_text_layers_than_the_encoder_has(tmp_path):
  config = _with_data(tmp_path, **{'model.text_encoder.num_layers': 13})
  with pytest.raises(ConfigError, match=r'config.model.text_encoder.num_layers is 13; expected '
                     'at most 12'):
    configuration.validate(config)


# ---------------------------------------------------------------------------- call sites

def test_training_and_evaluation_refuse_before_any_work(tmp_path):
  from cider_jax import evaluate, spec, train
  config = _config(**{'model.num_heads': 5})
  workdir = tmp_path / 'run'
  with pytest.raises(ConfigError, match='model.num_heads'):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()
  with pytest.raises(ConfigError, match='model.num_heads'):
    evaluate.evaluate(config, str(workdir))
  with pytest.raises(ConfigError, match='model.num_heads'):
    spec.parameter_counts(config)


def _launch(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'train.py'),
                         '--config', os.path.join(ROOT, 'configs', 'quickstart.py'), *args],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_launcher_unknown_key():
  r = _launch('--config.train.no_such_key=1')
  assert r.returncode == 2
  assert 'no_such_key' in r.stderr and 'Traceback' not in r.stderr
  errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
  assert errors == ["error: --config.train.no_such_key: the config has no field 'no_such_key'; "
                    'configs/default.py lists the fields']


def test_launcher_dry_run_with_impossible_heads():
  r = _launch('--config.model.num_heads=5', '--dry_run')
  assert r.returncode == 2
  assert 'Traceback' not in r.stderr and r.stdout == ''
  errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
  assert errors == ['error: config.model.num_heads is 5; expected a divisor of '
                    'model.embed_dim=32: 1, 2, 4, 8, 16 or 32']


def test_uri_workdir_needs_its_filesystem(monkeypatch):
  import importlib.util
  configuration.check_workdir('/tmp/run')  # local: a folder that can be made
  with pytest.raises(configuration.ConfigError, match='unsupported scheme ftp://'):
    configuration.check_workdir('ftp://host/run')
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'gcsfs' else real(name, *a))
  with pytest.raises(configuration.ConfigError, match='needs the gcsfs package.*requirements-gcs'):
    configuration.check_workdir('gs://bucket/run')
