"""Compatibility with the original PyTorch CIDer.

  reference.py        state dict <-> Flax params
  check_reference.py  python -m cider_jax.compat.check_reference FIXTURE.npz
  export_original.py  python -m cider_jax.compat.export_original MODEL.pt OUT.npz --original_src DIR
                      (torch, no jax: the original's whole-model file -> .npz)
  original.py         load_original(OUT.npz) -> (model, variables)
"""


def load_original(path, kernels='auto'):
  """(model, variables) of an export of the original's model file (see compat/original.py)."""
  # imported on use: export_original runs where torch is installed and jax may not be
  from cider_jax.compat import original  # pylint: disable=g-import-not-at-top
  return original.load_original(path, kernels)
