"""Default configuration: CIDer on MOSI (unaligned, 3-class) with the paper's hyper-parameters.

Every other config imports this one and changes a few fields. Override any field on the
command line, e.g. `--config.train.batch_size=64`.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # ---------------------------------------------------------------- data
  config.data = data = ml_collections.ConfigDict()
  data.source = 'mmsa'          # 'mmsa': MMSA pickles under data.dir; 'synthetic': generated data
  data.dir = ''                 # root holding CMU-MOSI/…, CMU-MOSEI/…, OOD_MOSI/…, MSA_cross_datasets/…
  data.file = ''                # explicit pickle path (overrides the layout under data.dir)
  data.dataset = 'mosi'         # 'mosi' or 'mosei' (for cross_dataset: the training source)
  data.aligned = False          # word-aligned features (skips WSAM) or unaligned
  data.setting = 'iid'          # 'iid', 'ood' (OOD repartition) or 'cross_dataset'
  data.cache_dir = ''           # where generated data / TFDS records are cached ('' = <workdir>/data)
  data.standardize = True       # audio/vision standardised per dimension with train-split statistics (False: raw, as the original)
  data.synthetic = synthetic = ml_collections.ConfigDict()
  synthetic.seed = 0            # generated data is a pure function of this seed and the sizes
  synthetic.n_train = 1200      # samples in the generated train split
  synthetic.n_valid = 300       # samples in the generated validation split
  synthetic.n_test = 300        # samples in the generated (shifted, OOD) test split
  synthetic.text_len = 50       # token positions L (MOSI: 50)
  synthetic.audio_len = 375     # audio frames (MOSI unaligned: 375)
  synthetic.vision_len = 500    # vision frames (MOSI unaligned: 500)
  synthetic.audio_dim = 5       # audio feature size (MOSI: 5)
  synthetic.vision_dim = 20     # vision feature size (MOSI: 20)
  synthetic.shifted_valid = False  # validation split drawn like the shifted test split
  synthetic.feature_scale = 1.0  # audio/vision valid frames multiplied by this (raw-scale features)
  synthetic.feature_shift = 0.0  # … and shifted by this

  # ---------------------------------------------------------------- task
  config.task = 'binary'        # 'binary' (the 3-class neg/neutral/pos task) or 'seven'

  # ---------------------------------------------------------------- model
  config.model = model = ml_collections.ConfigDict()
  model.name = 'cider'          # the base model MACI wraps: 'cider', 'late_fusion' or 'mag_bert'
  model.text_encoder = ml_collections.ConfigDict()
  model.text_encoder.path = 'pretrained/bert-base-uncased'  # HF folder: config.json, model.safetensors, vocab
  model.text_encoder.num_layers = 0  # use only the first k encoder layers (0: all)
  model.text_encoder.pooling = 'auto'  # mag_bert's sentence vector: 'cls', 'mean' or 'auto'
  #                                    (as the checkpoint was trained: its 1_Pooling folder)
  model.embed_dim = 32          # E, the width of everything after the text encoder
  model.num_heads = 8           # MCT heads (must divide embed_dim)
  model.layers = 3              # MCT layers
  model.attn_dropout = 0.0      # dropout on the LAV attention weights
  model.out_dropout = 0.3       # dropout inside the joint-representation residual MLP
  model.embed_dropout = 0.2     # dropout after adding MCT positions
  model.relu_dropout = 0.1      # dropout after the MCT feed-forward ReLU
  model.res_dropout = 0.1       # dropout on each MCT residual branch
  model.positions = 'time'      # 'time' (correct) or 'reference' (the original's batch-axis quirk)
  model.cross_dataset = False   # parameter-free LayerNorms in the audio/vision MCM encoders
  model.deterministic = False   # True turns every dropout off (equivalence tests)
  model.dtype = 'float32'       # text-encoder matmul operands: 'float32' or 'bfloat16'
  #                               (float32 accumulation; the rest and all params stay float32)
  model.kernels = 'auto'        # the implementations (cider_jax/backend.py): 'native' (C++
  #                               CPU kernels, built on first use), 'xla' (plain JAX, with the
  #                               CPU forms on the CPU backend), 'auto' (native on the CPU
  #                               backend when they build, else xla)

  # ---------------------------------------------------------------- losses (docs/model.md §4)
  config.loss = loss = ml_collections.ConfigDict()
  loss.w_rep = 0.5              # weight of 1 - cos(z_student, z_teacher)
  loss.w_attn = 0.1             # weight of KL(teacher scores || student scores), last MCT layer
  loss.w_rec = 0.6              # weight of the three masked SmoothL1 reconstruction losses

  # ---------------------------------------------------------------- optimiser (torch Adam parity)
  config.optim = optim = ml_collections.ConfigDict()
  optim.bert_lr = 5e-5          # text-encoder learning rate
  optim.bert_weight_decay = 1e-3  # L2 term added to text-encoder weight gradients (not biases/LN)
  optim.lr = 1e-3               # learning rate of everything else
  optim.b1 = 0.9                # Adam beta1
  optim.b2 = 0.999              # Adam beta2
  optim.eps = 1e-8              # Adam epsilon
  optim.grad_clip = 0.0         # global-norm gradient clipping per update (0: off, as the original)
  optim.schedule = 'constant'   # learning rates over the run (optim.lr_factor): 'constant' (the
  #                               original) or 'linear_tail' (constant, then a straight line
  #                               from decay_start of the run's steps to final_factor × the rate)
  optim.decay_start = 0.5       # 'linear_tail': fraction of the run's steps before the decay
  optim.final_factor = 0.1      # 'linear_tail': the rates' factor at the last step (> 0)
  optim.embedding_rows = 'auto'  # the word-embedding table's updates row-wise (embedding_rows.py):
  #                               'auto' (on the CPU backend, where it was measured faster),
  #                               'on' or 'off'

  # ---------------------------------------------------------------- training
  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 128        # global batch size (all devices together)
  train.num_epochs = 200        # upper bound on epochs
  train.patience = 10           # early stop after this many epochs without validation improvement
  train.min_epochs = 40         # … but never before this many epochs (docs/quickstart.md): a model
  #                               whose validation plateaus early still gets a fair chance
  train.select_on = 'auto'      # the checkpoint's validation score: 'factual', 'debiased' (MACI,
  #                               τ chosen on valid), 'auto' (debiased with MACI, else factual)
  train.collapse_epochs = 3     # warn when every validation example gets one class this many epochs in a row (0: never)
  train.seed = 1111             # parameter init, data order, RMFM masks, dropout
  train.max_steps = 0           # stop after this many steps (0: no limit)
  train.log_every = 20          # steps between metrics.jsonl lines
  train.accumulate_teacher_grad = True  # second update uses g_teacher + g_student (as the original)
  train.counterfactual_metrics = False  # also compute debiased train accuracy inside the step
  train.eval_batch_size = 256   # batch size for validation and evaluation
  train.evaluate_at_end = True  # run the full evaluation on the best checkpoint after training
  train.compilation_cache = '~/.cache/cider_jax/xla'  # persistent XLA cache ('' = off)

  # ---------------------------------------------------------------- MACI (docs/model.md §5)
  config.maci = maci = ml_collections.ConfigDict()
  maci.enabled = True           # MCM head + counterfactual debiasing; False: linear head, factual only
  maci.top_k = 100              # number of bias words kept
  maci.cv_threshold = 0.1       # coefficient of variation threshold for a bias word
  maci.tau_grid = (0.0, 3.0, 0.1)  # counterfactual strength grid (start, stop inclusive, step)
  maci.train_tau = 1.0          # τ of the debiased training accuracy (train.counterfactual_metrics)

  # ---------------------------------------------------------------- evaluation
  config.eval = ev = ml_collections.ConfigDict()
  ev.modes = ('RMFM', 'RMFM_same', 'RMM')  # missing modes evaluated (TMFM/STMFM: aligned only)
  ev.rates = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # missing rates
  ev.seed = 1111                # mask seed: every checkpoint sees the same masks
  ev.valid_rate = 0.5           # RMFM rate of the masked validation run during training

  # ---------------------------------------------------------------- sweep (launch/sweep.py)
  config.sweep = sweep = ml_collections.ConfigDict()
  sweep.seed = 0                # seed of the TPE sampler
  sweep.startup_trials = 10     # TPE's first trials sampled at random
  sweep.pruner = 'median'       # 'median': stop a trial whose validation metric falls below the
  #                               median of earlier trials at the same epoch; 'none': never
  sweep.pruner_startup_trials = 5  # complete trials before the pruner acts
  sweep.pruner_warmup_epochs = 2   # epochs of each trial before it may be pruned
  sweep.heartbeat_s = 60        # a running trial's heartbeat interval (database storages)
  sweep.grace_s = 180           # a trial without heartbeat this long is failed and retried
  sweep.max_retry = 3           # retries of a trial whose worker died
  sweep.study_name = 'cider'    # the study within the storage
  sweep.first_trial_default = True  # trial 0 takes the config's own values (a baseline)
  # the search space (the original's): <config field> = ('int', low, high[, step]),
  # ('float', low, high[, step]) or ('choice', value, value, ...); bounds inclusive.
  # Remove an entry, or give it one value ('choice', v), to fix that field.
  sweep.space = space = ml_collections.ConfigDict()
  space.model = ml_collections.ConfigDict()
  space.model.layers = ('int', 1, 4)
  space.model.num_heads = ('choice', 1, 2, 4, 8)
  space.model.attn_dropout = ('float', 0.0, 0.5, 0.1)
  space.model.out_dropout = ('float', 0.0, 0.5, 0.1)
  space.model.embed_dropout = ('float', 0.0, 0.5, 0.1)
  space.loss = ml_collections.ConfigDict()
  space.loss.w_rep = ('float', 0.0, 1.0, 0.1)
  space.loss.w_attn = ('float', 0.0, 1.0, 0.1)
  space.loss.w_rec = ('float', 0.0, 1.0, 0.1)

  # ---------------------------------------------------------------- multi-host
  config.distributed = ml_collections.ConfigDict()
  config.distributed.initialize = False  # call jax.distributed.initialize (Cloud TPU / multi-host)
  config.distributed.coordinator_address = ''  # host:port ('' = from the environment)
  config.distributed.num_processes = 0   # 0 = from the environment
  config.distributed.process_id = -1     # -1 = from the environment
  return config
