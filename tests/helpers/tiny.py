"""A tiny CIDer (random BERT: vocab 128, hidden 48, 2 layers) and random batches, for tests."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from cider_jax import counterfactual
from cider_jax.models.bert import BertConfig
from cider_jax.spec import ModelSpec

TINY_BERT = BertConfig(vocab_size=128, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=96, max_position_embeddings=64,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
SPEC = ModelSpec(seq_lens=(12, 20, 24), feature_dims=(5, 20), num_classes=3, aligned=False)


def config(deterministic=True, batch_size=8):
  c = default.get_config()
  c.model.deterministic = deterministic
  c.model.num_heads = 4
  c.model.layers = 2
  c.train.batch_size = batch_size
  c.train.compilation_cache = ''
  return c


def consts(seed=0):
  rng = np.random.RandomState(seed)
  return {'cls_feats': jnp.asarray(rng.randn(3, 48 + 5 + 20).astype(np.float32) * 0.1),
          'cls_probs': jnp.asarray([0.3, 0.2, 0.5], jnp.float32),
          'bias_table': counterfactual.bias_lookup_table(np.arange(104, 110), 128)}


def batch(B, seed=0, spec=SPEC):
  rng = np.random.RandomState(seed)
  L, La, Lv = spec.seq_lens
  Da, Dv = spec.feature_dims
  t_len = rng.randint(4, L + 1, size=B)
  tm = (np.arange(L)[None] < t_len[:, None]).astype(np.float32)
  ids = rng.randint(104, 128, size=(B, L))
  ids[:, 0] = 101
  ids[np.arange(B), t_len - 1] = 102
  am = (np.arange(La)[None] < rng.randint(3, La + 1, size=B)[:, None]).astype(np.float32)
  vm = (np.arange(Lv)[None] < rng.randint(3, Lv + 1, size=B)[:, None]).astype(np.float32)
  return {'text_ids': (ids * tm).astype(np.int32), 'text_mask': tm,
          'text_segments': np.zeros((B, L), np.int32),
          'audio': (rng.randn(B, La, Da) * am[..., None]).astype(np.float32), 'audio_mask': am,
          'vision': (rng.randn(B, Lv, Dv) * vm[..., None]).astype(np.float32), 'vision_mask': vm,
          'label': rng.randint(0, 3, size=B).astype(np.int32), 'valid': np.ones(B, np.float32),
          'index': np.arange(B, dtype=np.int32)}
