"""A workdir as a finished run leaves it, without training: constants.npz and a best
checkpoint of a randomly initialised model, then its evaluation."""
import os

import numpy as np

from configs import quickstart
from cider_jax import checkpoint as ckpt_lib
from cider_jax import evaluate as eval_lib
from cider_jax import run_state, spec as spec_lib
from cider_jax.data import pipeline, standardize


def small_config(tmp, modes=('RMFM', 'RMM'), rates=(0.0, 0.5, 1.0), eval_batch_size=16):
  """The quickstart at test size: 48 / 40 / 40 generated examples, L 12, La 20, Lv 24, one
  MiniLM layer, one MCT layer; generated data cached under tmp/cache."""
  c = quickstart.get_config()
  s = c.data.synthetic
  s.n_train, s.n_valid, s.n_test = 48, 40, 40
  s.text_len, s.audio_len, s.vision_len = 12, 20, 24
  c.data.cache_dir = str(tmp / 'cache')
  c.model.text_encoder.num_layers = 1
  c.model.layers = 1
  c.eval.modes, c.eval.rates = tuple(modes), tuple(rates)
  c.train.eval_batch_size = eval_batch_size
  c.train.compilation_cache = ''
  return c


def random_best_run(config, workdir, bias_vocab=None, evaluate=True):
  """(splits, report). bias_vocab(splits) -> the constants' bias-vocabulary entries (default:
  the train split's bias vocabulary under config.maci). evaluate=False: no evaluation (report
  None), only constants.npz and the best checkpoint."""
  os.makedirs(workdir)
  splits = pipeline.load_splits(config, workdir)
  spec = spec_lib.spec_from_split(splits['train'], config)
  bert_config = spec_lib.text_encoder_config(config)
  rng = np.random.RandomState(0)
  bias = (bias_vocab(splits) if bias_vocab else run_state.bias_vocab(config, splits['train']))
  c = {'cls_feats': rng.randn(3, bert_config.hidden_size + 25).astype(np.float32),
       'prior': np.array([0.4, 0.2, 0.4], np.float32), **bias,
       **standardize.statistics(splits['train'])}
  np.savez(os.path.join(workdir, 'constants.npz'), **c)
  _, _, _, state = run_state.init_state(config, spec, bert_config,
                                        run_state.train_consts(c, bert_config.vocab_size))
  meta = {'epoch': 1, 'best': 0.5, 'best_epoch': 1, 'config': ckpt_lib.config_to_dict(config),
          'spec': ckpt_lib.spec_to_json(spec)}
  ckpt_lib.Checkpoints(workdir).save('best', 1, state, meta)
  return splits, eval_lib.evaluate(config, workdir) if evaluate else None
