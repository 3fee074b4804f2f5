"""cider_jax: CIDer (robust multimodal emotion recognition) in JAX/Flax."""


def predict(*args, **kwargs):
  """Class probabilities for new samples from a trained run (see cider_jax.inference)."""
  from cider_jax.inference import predict as _predict
  return _predict(*args, **kwargs)
