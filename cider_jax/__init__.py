"""cider_jax: CIDer (robust multimodal emotion recognition) in JAX/Flax."""


def predict(*args, **kwargs):
  """Class probabilities for new samples from a trained run (see cider_jax.inference)."""
  # Imported on first use: this file runs before any module of the package is imported, so an
  # import here at the top would load the whole evaluation stack with `cider_jax.tokens` too,
  # and close a cycle (cider_jax -> inference -> evaluate -> … -> modules of cider_jax).
  from cider_jax.inference import predict as _predict  # pylint: disable=g-import-not-at-top
  return _predict(*args, **kwargs)


def __getattr__(name):
  """`cider_jax.Predictor` (cider_jax.inference.Predictor), imported on first use."""
  if name == 'Predictor':
    from cider_jax.inference import Predictor  # pylint: disable=g-import-not-at-top
    return Predictor
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
