"""Run 5 pmapped train steps over all local devices on fixed global batches; print the losses
and the word-embedding table after them.

  multidevice_losses.py GLOBAL_BATCH [dense]   (dense: optim.embedding_rows='off')

Used by tests/test_train_step.py in a subprocess (the device count is fixed at jax import).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402

from cider_jax import parallel, run_state  # noqa: E402
from tests.helpers import tiny  # noqa: E402


def main():
  global_batch = int(sys.argv[1])
  n = jax.local_device_count()
  config = tiny.config(batch_size=global_batch)
  config.optim.embedding_rows = 'off' if sys.argv[2:] == ['dense'] else 'on'
  parallel.check_batch(global_batch, n)
  model, tx, labels, state = run_state.init_state(config, tiny.SPEC, tiny.TINY_BERT, tiny.consts())
  from cider_jax.train_step import make_train_step
  step = make_train_step(model, tx, labels, config, axis_name='batch')
  r = parallel.replicate(state)
  out = []
  for i in range(5):
    r, m = step(r, parallel.shard(tiny.batch(global_batch, seed=i), n))
    out.append({k: float(v[0]) for k, v in m.items() if k.startswith('loss')})
  table = jax.device_get(r.params['text_encoder']['embeddings']['word_embeddings']['embedding'])
  print(json.dumps({'devices': n, 'losses': out, 'table': table[0].tolist()}))


if __name__ == '__main__':
  main()
