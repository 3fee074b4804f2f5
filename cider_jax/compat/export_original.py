"""Export a model file of the original PyTorch CIDer for cider_jax (runs with torch, no jax).

The original saves whole models (`torch.save(model)`): unpickling one needs torch and the
original's source (`src/models.py`, `modules/`) on the path, so this runs in the environment
the original runs in, and imports only numpy and torch:

  python -m cider_jax.compat.export_original MODEL.pt OUT.npz --original_src DIR

OUT.npz holds the state dict as numpy arrays (`param/<torch name>`) and, in `meta_json`, the
hyper-parameters read from the model object (`hparams`: sequence lengths, feature sizes, embed
dim, heads, layers, classes, aligned, cross-dataset) and its BERT configuration (`bert`), the
format of the parity fixtures. `cider_jax.compat.load_original(OUT.npz)` builds the Flax model
from it.

Unpickling runs code from MODEL.pt: export only files you trust (the original's own releases).
"""
import argparse
import json
import os
import sys

import numpy as np

FORMAT = 'cider_jax.original_export'
VERSION = 1


class ExportError(ValueError):
  pass


def hyper_parameters(model) -> dict:
  """The architecture of an original `CIDERModel` object, read from its attributes and
  submodules (layers, heads and classes also follow from the state dict's names and shapes)."""
  need = ('orig_l_len', 'orig_a_len', 'orig_v_len', 'orig_d_l', 'orig_d_a', 'orig_d_v',
          'embed_dim', 'num_heads', 'multimodal_layers', 'output_dim', 'aligned')
  missing = [k for k in need if not hasattr(model, k)]
  if missing:
    raise ExportError(f'the model object has no attribute(s) {missing}: not the original '
                      f"CIDERModel (got {type(model).__module__}.{type(model).__name__})")
  hp = {'l_len': int(model.orig_l_len), 'a_len': int(model.orig_a_len),
        'v_len': int(model.orig_v_len), 'orig_d_l': int(model.orig_d_l),
        'orig_d_a': int(model.orig_d_a), 'orig_d_v': int(model.orig_d_v),
        'embed_dim': int(model.embed_dim), 'num_heads': int(model.num_heads),
        'multimodal_layers': int(model.multimodal_layers), 'output_dim': int(model.output_dim),
        'aligned': bool(model.aligned),
        'cross_dataset': not hasattr(model, 'cls_encoders_a')}
  for k in ('attn_dropout', 'relu_dropout', 'res_dropout', 'out_dropout', 'embed_dropout'):
    if hasattr(model, k):
      hp[k] = float(getattr(model, k))
  hp['language'] = str(getattr(model, 'language', 'en'))
  return hp


def bert_config(model) -> dict:
  """The text encoder's BERT configuration (a Hugging Face config as a dict)."""
  try:
    cfg = model.text_model.model.config
  except AttributeError:
    raise ExportError('the model has no text_model.model.config (its BERT)') from None
  return {k: v for k, v in cfg.to_dict().items()
          if isinstance(v, (int, float, str, bool)) or v is None}


def export(model, out_path: str, source: str = '') -> dict:
  """Writes `out_path` (.npz) from an original CIDERModel object; returns its meta."""
  state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
  return write_export(state, hyper_parameters(model), bert_config(model), out_path, source)


def write_export(state: dict, hparams: dict, bert: dict, out_path: str, source: str = '') -> dict:
  """Writes an export: state dict {torch name: array}, hyper-parameters (`hyper_parameters`'
  keys) and the BERT config; returns the meta."""
  meta = {'format': FORMAT, 'version': VERSION, 'source': os.path.basename(source),
          'hparams': hparams, 'bert': bert,
          'param_shapes': {k: list(np.shape(v)) for k, v in state.items()}}
  arrays = {f'param/{k}': np.asarray(v) for k, v in state.items()}
  arrays['meta_json'] = np.array(json.dumps(meta))
  out_dir = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(out_dir, exist_ok=True)
  np.savez(out_path, **arrays)
  return meta


def load_model_file(path: str, original_src: str):
  """The model object of a whole-model pickle, with the original's source on sys.path."""
  import torch  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(os.path.join(original_src, 'src')):
    raise ExportError(f'--original_src {original_src}: expected the original repository '
                      '(a folder holding src/models.py and modules/)')
  sys.path.insert(0, os.path.abspath(original_src))
  if not os.path.isfile(path):
    raise ExportError(f'{path}: no such file')
  obj = torch.load(path, map_location='cpu', weights_only=False)
  if isinstance(obj, dict):
    raise ExportError(f'{path} holds a dict (a state dict?), not a whole model: this tool reads '
                      'the files the original writes with torch.save(model)')
  return obj


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m cider_jax.compat.export_original',
      description='Export an original CIDer model file (torch.save(model)) to an .npz that '
      'cider_jax reads (cider_jax.compat.load_original, launch/evaluate.py '
      '--original_weights). Needs torch and the original source; does not need jax. '
      'Unpickling runs code from the file: export only files you trust.')
  parser.add_argument('model', help="the original's model file (.pt)")
  parser.add_argument('out', help='the .npz to write')
  parser.add_argument('--original_src', required=True, metavar='DIR',
                      help='a checkout of the original repository (holds src/ and modules/)')
  args = parser.parse_args(argv)
  try:
    model = load_model_file(args.model, args.original_src)
    meta = export(model, args.out, source=args.model)
  except ExportError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  except ModuleNotFoundError as e:
    print(f'error: {args.model}: unpickling needs module {e.name!r}: is --original_src the '
          'original repository, and torch / transformers installed?', file=sys.stderr)
    return 1
  hp = meta['hparams']
  print(f'{args.out}: {len(meta["param_shapes"])} tensors; L/La/Lv {hp["l_len"]}/{hp["a_len"]}/'
        f'{hp["v_len"]}, features {hp["orig_d_l"]}/{hp["orig_d_a"]}/{hp["orig_d_v"]}, embed '
        f'{hp["embed_dim"]}, {hp["num_heads"]} heads, {hp["multimodal_layers"]} layers, '
        f'{hp["output_dim"]} classes, aligned={hp["aligned"]}, '
        f'cross_dataset={hp["cross_dataset"]}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
