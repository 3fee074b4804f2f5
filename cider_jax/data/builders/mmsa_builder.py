"""Builder configs of the MMSA datasets (MOSI, MOSEI), read from pickles in a manual dir.

The manual dir is the root of docs/model.md §1's layout (the `--config.data.dir` folder);
a config with `file` set reads that one pickle instead.
"""
import hashlib
import os

import tensorflow_datasets as tfds

from cider_jax.data import mmsa
from cider_jax.data.builders import base

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put the MMSA pickles under the manual dir (`--config.data.dir`), in the original layout:
  CMU-MOSI/Processed/{aligned,unaligned}_50.pkl
  CMU-MOSEI/Processed/{aligned,unaligned}_50.pkl
  OOD_MOSI/{binary,seven}/MOSI_{aligned,unaligned}_50.pkl
  MSA_cross_datasets/{mosi,mosei}.pkl
"""


class MmsaConfig(tfds.core.BuilderConfig):
  """setting ('iid', 'ood', 'cross_dataset'), aligned, task (OOD folder), optional file."""

  def __init__(self, *, setting='iid', aligned=False, task='binary', file='', **kwargs):
    super().__init__(**kwargs)
    self.setting, self.aligned, self.task, self.file = setting, aligned, task, file


def standard_configs(dataset: str, with_ood: bool) -> list:
  configs = [MmsaConfig(name=kind, aligned=kind == 'aligned',
                        description=f'{dataset.upper()} {kind}, iid split')
             for kind in ('unaligned', 'aligned')]
  if with_ood:
    configs += [MmsaConfig(name=f'ood_{task}_{kind}', setting='ood', task=task,
                           aligned=kind == 'aligned',
                           description=f'{dataset.upper()} {kind}, OOD repartition ({task})')
                for task in ('binary', 'seven') for kind in ('unaligned', 'aligned')]
  configs.append(MmsaConfig(name='cross_dataset', setting='cross_dataset', aligned=True,
                            description=f'train/valid {dataset.upper()}, test the other set'))
  return configs


def config_name(setting: str, aligned: bool, task: str) -> str:
  kind = 'aligned' if aligned else 'unaligned'
  if setting == 'iid':
    return kind
  if setting == 'ood':
    return f'ood_{task}_{kind}'
  return 'cross_dataset'


def file_config(path: str, aligned: bool, setting: str) -> MmsaConfig:
  """Config for one explicit pickle; the name changes when the file does (path, size, mtime)."""
  path = os.path.abspath(path)
  stat = os.stat(path) if os.path.exists(path) else None
  key = f'{path}|{stat.st_size if stat else -1}|{stat.st_mtime_ns if stat else -1}|{aligned}'
  key += f'|{setting}'
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  return MmsaConfig(name=f'file_{digest}', file=path, aligned=aligned, setting=setting,
                    description=f'MMSA pickle {path}')


class MmsaDatasetBuilder(base.MmsaBuilder, skip_registration=True):
  """Reads and validates the pickles of `DATASET` ('mosi' or 'mosei')."""

  DATASET = ''
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def load_splits(self, dl_manager) -> dict:
    cfg = self.builder_config
    data_cfg = dict(dataset=self.DATASET, aligned=cfg.aligned, setting=cfg.setting,
                    file=cfg.file, dir='' if cfg.file else str(dl_manager.manual_dir))
    return mmsa.load_mmsa(data_cfg, task=cfg.task)
