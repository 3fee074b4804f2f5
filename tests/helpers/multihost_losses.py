"""One process of a multi-host run on localhost: 5 pmapped train steps over every device of
every process, each process feeding its own slice of the fixed global batches; prints the losses.

  python tests/helpers/multihost_losses.py GLOBAL_BATCH PROCESS_ID NUM_PROCESSES PORT

Used by tests/test_parallel.py, which starts the processes (each with 2 CPU devices) and
compares their losses with one process holding all the devices.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from cider_jax import parallel, run_state  # noqa: E402
from tests.helpers import tiny  # noqa: E402


def main():
  global_batch, process_id, num_processes, port = map(int, sys.argv[1:5])
  parallel.initialize(ml_collections.ConfigDict({
      'initialize': True, 'coordinator_address': f'localhost:{port}',
      'num_processes': num_processes, 'process_id': process_id}))
  n_local, n_global = jax.local_device_count(), jax.device_count()
  config = tiny.config(batch_size=global_batch)
  parallel.check_batch(global_batch, n_global)
  model, tx, labels, state = run_state.init_state(config, tiny.SPEC, tiny.TINY_BERT, tiny.consts())
  from cider_jax.train_step import make_train_step
  step = make_train_step(model, tx, labels, config, axis_name='batch')
  r = parallel.replicate(state)
  index, count = parallel.process_shard_options()
  per_process = global_batch // count
  rows = slice(index * per_process, (index + 1) * per_process)
  out = []
  for i in range(5):
    local = jax.tree.map(lambda x: np.asarray(x)[rows], tiny.batch(global_batch, seed=i))
    r, m = step(r, parallel.shard(local, n_local))
    out.append({k: float(v[0]) for k, v in m.items() if k.startswith('loss')})
  print(json.dumps({'process': index, 'processes': count, 'devices': n_global,
                    'local_devices': n_local, 'losses': out}))
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
