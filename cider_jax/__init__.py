"""cider_jax: CIDer (robust multimodal emotion recognition) in JAX/Flax."""
