"""Data: MMSA pickles, generated data, TFDS storage and the grain input pipeline.

  mmsa.py       reader + validation of MMSA pickles -> typed `Split`s
  synthetic.py  deterministic generated data in the MMSA format (the quickstart's)
  builders/     TFDS builders (array_record) and `build_source`
  pipeline.py   `load_splits`, `train_iterator`, `eval_batches`

`load_splits(config, workdir)` is the entry point of the training loop; it is imported
lazily so that `python -m cider_jax.data.mmsa` stays quick.
"""


def load_splits(config, workdir=None, **kwargs):
  """{'train', 'valid', 'test'} -> `mmsa.Split`; see `pipeline.load_splits`."""
  from cider_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.load_splits(config, workdir, **kwargs)
