"""The original's trained weights in cider_jax, without torch: a random reference-positions
model's state dict in the original's layout (flax_to_torch), written in the export format,
loaded back with load_original and evaluated on generated data."""
import dataclasses
import json
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cider_jax import evaluate as eval_lib
from cider_jax import metrics
from cider_jax import spec as spec_lib
from cider_jax.compat import export_original, load_original
from cider_jax.compat.original import OriginalWeightsError
from cider_jax.compat.reference import flax_to_torch
from cider_jax.data import pipeline
from cider_jax.models.cider import CIDer, example_inputs
from configs import default
from cider_jax.models import bert as bert_lib
from cider_jax.models.bert import BertEncoder
from tests.conftest import make_mmsa
from tests.helpers.tiny import TINY_BERT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_bert_folder(path):
  """A Hugging Face-style folder of a random tiny BERT (config.json, model.safetensors,
  vocab.txt with BERT's special-token ids)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  cfg = dict(dataclasses.asdict(TINY_BERT), model_type='bert', hidden_act='gelu')
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  encoder = BertEncoder(TINY_BERT)
  ids = jnp.zeros((1, 8), jnp.int32)
  params = encoder.init(jax.random.PRNGKey(3), ids, jnp.ones((1, 8)), ids)['params']
  save_file({k: np.asarray(v) for k, v in bert_lib.flax_to_hf(jax.device_get(params)).items()},
            os.path.join(path, 'model.safetensors'))
  words = [f'[unused{i}]' for i in range(TINY_BERT.vocab_size)]
  for i, tok in ((0, '[PAD]'), (100, '[UNK]'), (101, '[CLS]'), (102, '[SEP]'), (103, '[MASK]')):
    words[i] = tok
  with open(os.path.join(path, 'vocab.txt'), 'w') as f:
    f.write('\n'.join(words) + '\n')
  return str(path)


def _tiny_data(path):
  """An MMSA pickle (24 / 16 / 16 examples, L 12, audio 20 × 5, vision 24 × 20) whose words
  are ids 104–127 of the tiny vocabulary."""
  data = make_mmsa(sizes=(24, 16, 16), text_len=12, audio_len=20, vision_len=24)
  for split in data.values():
    ids = split['text_bert'][:, 0]
    split['text_bert'][:, 0] = np.where(ids >= 1000, 104 + ids % 24, ids)
  with open(path, 'wb') as f:
    pickle.dump(data, f)
  return str(path)


def _tiny_config(tmp):
  c = default.get_config()
  c.data.source, c.data.file = 'mmsa', _tiny_data(tmp / 'data.pkl')
  c.model.text_encoder.path = _tiny_bert_folder(tmp / 'bert')
  c.eval.modes, c.eval.rates = ('RMFM', 'RMM'), (0.0, 0.5, 1.0)
  c.train.eval_batch_size = 16
  c.train.compilation_cache = ''
  return c


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """(config, path of the export, the Flax model, its params, the data splits, tmp)."""
  tmp = tmp_path_factory.mktemp('original')
  config = _tiny_config(tmp)
  splits = pipeline.load_splits(config, str(tmp / 'data'))
  spec = spec_lib.spec_from_split(splits['train'], config)
  bert = TINY_BERT
  model = CIDer(bert, 3, False, (bert.hidden_size,) + spec.feature_dims, spec.seq_lens,
                embed_dim=16, num_heads=2, layers=2, positions='reference')
  params = model.init(jax.random.PRNGKey(7), *example_inputs(
      2, spec.seq_lens, model.feature_dims, 3))['params']
  L, La, Lv = spec.seq_lens
  hparams = {'l_len': L, 'a_len': La, 'v_len': Lv, 'orig_d_l': bert.hidden_size,
             'orig_d_a': spec.feature_dims[0], 'orig_d_v': spec.feature_dims[1],
             'embed_dim': 16, 'num_heads': 2, 'multimodal_layers': 2, 'output_dim': 3,
             'aligned': False, 'cross_dataset': False}
  path = str(tmp / 'export.npz')
  export_original.write_export(flax_to_torch(jax.device_get(params)), hparams,
                               dataclasses.asdict(bert), path, source='model.pt')
  return config, path, model, params, splits, tmp


def _inputs(split, n=5):
  return {k: jnp.asarray(getattr(split, k)[:n]) for k in (
      'text_ids', 'text_mask', 'text_segments', 'audio', 'audio_mask', 'vision', 'vision_mask')}


def test_load_original_gives_the_same_model(exported):
  _, path, model, params, splits, _ = exported
  loaded, variables = load_original(path, kernels='xla')
  base = loaded.base                          # CIDer = MACI(CIDerBase)
  assert base.positions == 'reference'
  assert (base.seq_lens, loaded.feature_dims, loaded.num_classes, base.embed_dim,
          base.num_heads, base.layers) == (model.base.seq_lens, model.feature_dims, 3, 16, 2, 2)
  x = _inputs(splits['valid'])
  feats = jnp.asarray(np.random.RandomState(0).randn(3, 5, sum(model.feature_dims)) * 0.1,
                      jnp.float32)
  probs = jnp.full((5, 3), 1 / 3, jnp.float32)
  want = model.apply({'params': params}, x, feats, probs)['logp']
  got = loaded.apply(variables, x, feats, probs, deterministic=True)['logp']
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_evaluate_original_writes_the_full_report(exported):
  config, path, _, _, _, tmp = exported
  workdir = str(tmp / 'eval_run')
  report = eval_lib.evaluate_original(config, workdir, path)
  assert report['checkpoint'] == {'original_weights': path}
  assert report['tau']['selected_on'] == 'valid'
  assert set(report['modes']) == {'RMFM', 'RMM'} and set(report['test_oracle']) == {'RMFM', 'RMM'}
  for name in ('report.json', 'report.csv', 'predictions.npz', 'Non0_acc_2_vs_rate.png'):
    assert os.path.exists(os.path.join(workdir, 'eval', name)), name
  with open(os.path.join(workdir, 'eval', 'report.json')) as f:
    assert json.load(f)['modes']['RMFM']['rates'] == [0.0, 0.5, 1.0]
  # the figures are those of the exported model: its complete-input test log-probabilities
  # recomputed with the fixture's own Flax model and parameters (raw features, every class
  # the mean train prototype, a uniform prior, one batch of all 16 examples), and the report's
  # accuracy from them and the test labels of the pickle
  _, _, model, params, splits, _ = exported
  with np.load(os.path.join(workdir, 'constants.npz')) as z:
    proto = np.asarray(z['cls_feats'], np.float32).mean(0)
  test = splits['test']
  n = len(test.label3)
  feats = jnp.asarray(np.broadcast_to(proto, (3, n, proto.shape[0])))
  prior = jnp.full((n, 3), 1 / 3, jnp.float32)
  want = model.apply({'params': params}, _inputs(test, n), feats, prior)['logp']
  with np.load(os.path.join(workdir, 'eval', 'predictions.npz')) as z:
    got, labels = z['test/RMFM/0.0/factual'], z['test/RMFM/0.0/labels']
  np.testing.assert_allclose(got, np.asarray(want), rtol=0, atol=1e-5)
  np.testing.assert_array_equal(labels, test.labels(config.task))
  acc = metrics.classification_metrics(got, labels, config.task)['Non0_acc_2']
  assert report['modes']['RMFM']['factual']['Non0_acc_2'][0] == pytest.approx(acc)


def test_weights_that_do_not_fit_the_data(exported):
  config, path, _, _, _, tmp = exported
  other = config.copy_and_resolve_references()
  other.task = 'seven'
  with pytest.raises(OriginalWeightsError, match=r'hparams.output_dim is 3, the classes of '
                     r"config.task 'seven' are 7"):
    eval_lib.evaluate_original(other, str(tmp / 'seven'), path)
  other = config.copy_and_resolve_references()
  other.data.file = str(tmp / 'short.pkl')
  data = make_mmsa(sizes=(4, 4, 4), text_len=12, audio_len=16, vision_len=24)
  for split in data.values():
    split['text_bert'][:, 0] = np.where(split['text_bert'][:, 0] >= 1000, 110,
                                        split['text_bert'][:, 0])
  with open(other.data.file, 'wb') as f:
    pickle.dump(data, f)
  with pytest.raises(OriginalWeightsError, match=r'hparams.a_len is 20, the audio frames of the '
                     r'data are 16'):
    eval_lib.evaluate_original(other, str(tmp / 'short'), path)


def test_export_with_wrong_shapes_names_the_parameter(exported, tmp_path):
  _, path, _, _, _, _ = exported
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  arrays['param/proj2.weight'] = arrays['param/proj2.weight'][:, :-1]
  bad = str(tmp_path / 'bad.npz')
  np.savez(bad, **arrays)
  with pytest.raises(OriginalWeightsError, match=r'bad.npz: parameter joint/proj2/kernel has '
                     r'shape \(47, 48\), the hyper-parameters ask for \(48, 48\)'):
    load_original(bad, kernels='xla')
  np.savez(str(tmp_path / 'nometa.npz'), x=np.zeros(2))
  with pytest.raises(OriginalWeightsError, match='no meta_json'):
    load_original(str(tmp_path / 'nometa.npz'))


def test_launcher_flag_reports_misfit_as_one_error(exported):
  config, path, _, _, _, tmp = exported
  r = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'evaluate.py'), '--config',
       os.path.join(ROOT, 'configs', 'default.py'), '--workdir', str(tmp / 'cli'),
       '--original_weights', path, '--config.data.file', config.data.file,
       '--config.model.text_encoder.path', config.model.text_encoder.path, '--config.task=seven'],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert r.returncode == 2, r.stderr[-2000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
  assert errors == [f"error: {path}: hparams.output_dim is 3, the classes of config.task "
                    "'seven' are 7"], r.stderr[-2000:]


def test_export_tool_imports_no_jax():
  code = ('import sys; import cider_jax.compat.export_original as e; '
          'assert "jax" not in sys.modules, sorted(m for m in sys.modules if "jax" in m); '
          'print(e.FORMAT)')
  r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0 and r.stdout.strip() == 'cider_jax.original_export', r.stderr
