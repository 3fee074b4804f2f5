"""Devices and hosts: distributed initialisation, batch sharding, replication."""
import os

import jax
import numpy as np
from flax import jax_utils


def initialize(cfg) -> None:
  """jax.distributed.initialize from config.distributed (or the environment) when asked."""
  if not cfg.initialize:
    return
  kwargs = {}
  if cfg.coordinator_address:
    kwargs['coordinator_address'] = cfg.coordinator_address
  if cfg.num_processes:
    kwargs['num_processes'] = cfg.num_processes
  if cfg.process_id >= 0:
    kwargs['process_id'] = cfg.process_id
  jax.distributed.initialize(**kwargs)


def check_batch(global_batch: int, n_devices: int) -> None:
  if global_batch < n_devices or global_batch % n_devices:
    raise ValueError(f'train.batch_size={global_batch} must be a positive multiple of the '
                     f'number of devices ({n_devices})')


def shard(batch, n: int):
  """Host-local batch (B, ...) → (n, B / n, ...)."""
  return jax.tree.map(lambda x: np.asarray(x).reshape((n, -1) + np.shape(x)[1:]), batch)


def replicate(tree):
  """Copies of a host tree on every local device, laid out exactly as pmap's own outputs.

  jax_utils.replicate alone gives arrays whose sharding differs from what a pmapped step
  returns, and pmap would then compile the step a second time for its own outputs.
  """
  return _identity(jax_utils.replicate(tree))


_identity = jax.pmap(lambda x: x)


def unreplicate(tree):
  return jax.device_get(jax_utils.unreplicate(tree))


def process_shard_options():
  return (jax.process_index(), jax.process_count())


def enable_compilation_cache(path: str) -> None:
  """Persist compiled XLA programs under `path` ('' = off): a resumed or repeated run with the
  same shapes skips the compilation of its train and eval steps."""
  if not path:
    return
  jax.config.update('jax_compilation_cache_dir', os.path.expanduser(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
