"""The paper setting: MOSI unaligned, 3-class, bert-base-uncased, RMFM training (docs/model.md §4).

  python launch/train.py --config configs/rmfm.py --config.data.dir=DIR \
      --config.model.text_encoder.path=BERT_DIR --workdir=W
"""
from configs import default


def get_config():
  return default.get_config()
