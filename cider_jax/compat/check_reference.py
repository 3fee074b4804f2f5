"""Check cider_jax against a fixture produced by the original PyTorch CIDer.

  python -m cider_jax.compat.check_reference FIXTURE.npz [--kernels auto|native|xla]

Reads the architecture from the file (`meta_json` and shapes), converts `param/*` to Flax,
runs the teacher, student and test passes, the loss terms and one full training iteration
with the fixture's keep-masks, and prints as its last line one JSON object mapping every
compared key to its max absolute difference, after one JSON object with the rule that judged
float32 noise and the count of noise elements per parameter. Exit status 0 only if all are
within tolerance: outputs and losses 1e-4; parameters after the step 1e-5, except elements
whose gradient in the original's run (the fixture's `grad_teacher/`, `grad_second/`; cider_jax's
own for fixtures without them) is below 1e-6 in either update (keys ending in `_small_grad`:
Adam turns float32 noise there into updates of up to about lr each, of either sign,
docs/model.md §4, so two implementations can differ by up to twice the sum of the bounds of the
updates the element takes, `noise_tolerance`).
"""
import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cider_jax import losses, optim
from cider_jax.compat.original import build_reference_model
from cider_jax.compat.reference import BUFFERS, flax_to_torch, torch_to_flax
from cider_jax.train_step import TrainState, train_step

OUTPUT_TOL = 1e-4
PARAM_TOL = 1e-5
SMALL_GRAD = 1e-6


def adam_step_bound(b1: float, b2: float, t: int) -> float:
  """The largest |m̂_t| / sqrt(v̂_t) over all gradient sequences g_1..g_t (eps = 0).

  m̂_t = Σ a_i g_i and v̂_t = Σ c_i g_i² with a_i = (1-b1) b1^(t-i) / (1-b1^t) and
  c_i = (1-b2) b2^(t-i) / (1-b2^t); by Cauchy-Schwarz (Σ a_i g_i)² ≤ (Σ a_i²/c_i)(Σ c_i g_i²),
  with equality for g_i ∝ a_i / c_i, so the bound is sqrt(Σ a_i²/c_i): 1 at t = 1, 1.0014 at
  t = 2 for the betas (0.9, 0.999).
  """
  a = [(1 - b1) * b1 ** (t - i) / (1 - b1 ** t) for i in range(1, t + 1)]
  c = [(1 - b2) * b2 ** (t - i) / (1 - b2 ** t) for i in range(1, t + 1)]
  return sum(x * x / y for x, y in zip(a, c)) ** 0.5


def noise_tolerance(lr: float, b1: float, b2: float, steps) -> float:
  """How far apart two implementations can put an element whose gradient is rounding noise
  after Adam updates with the bias-correction steps `steps`: each moves it by at most
  lr · adam_step_bound per update, in a direction the noise picks, so they differ by up to
  twice the sum."""
  return 2 * lr * sum(adam_step_bound(b1, b2, t) for t in steps)


class FixtureError(ValueError):
  pass


def load_fixture(path):
  try:
    z = np.load(path, allow_pickle=False)
    meta = json.loads(str(z['meta_json']))
  except FileNotFoundError:
    raise FixtureError(f'{path}: no such file')
  except Exception as e:  # not an npz, or no meta_json
    raise FixtureError(f'{path}: not a fixture in the format of docs/model.md §6 ({e})')
  return {k: z[k] for k in z.files}, meta


def build(arrays, meta, kernels='auto'):
  """(model, params, cross_dataset) of a fixture; kernels: a model.kernels choice, or a
  models.ops.Ops to build the model with."""
  state = {k[len('param/'):]: v for k, v in arrays.items() if k.startswith('param/')}
  seq = (arrays['input/text'].shape[2], arrays['input/audio'].shape[1],
         arrays['input/vision'].shape[1])
  model, cross = build_reference_model(state, meta['bert'], meta['hparams']['aligned'],
                                       int(meta['hparams']['num_heads']), seq, kernels)
  return model, torch_to_flax(state), cross


def inputs_of(arrays, text_key, suffix=''):
  t = arrays[text_key]
  return {'text_ids': jnp.asarray(t[:, 0], jnp.int32), 'text_mask': jnp.asarray(t[:, 1]),
          'text_segments': jnp.asarray(t[:, 2], jnp.int32),
          'audio': jnp.asarray(arrays['input/audio' + suffix]),
          'audio_mask': jnp.asarray(arrays['input/audio_mask']),
          'vision': jnp.asarray(arrays['input/vision' + suffix]),
          'vision_mask': jnp.asarray(arrays['input/vision_mask'])}


def train_config(meta):
  c = ml_collections.ConfigDict()
  adam, w = meta['adam'], meta['train_weights']
  c.optim = dict(bert_lr=adam['bert_lr'], bert_weight_decay=adam['bert_weight_decay'],
                 lr=adam['lr'], b1=adam['betas'][0], b2=adam['betas'][1], eps=adam['eps'],
                 grad_clip=0.0)
  c.loss = dict(w_rep=w['joint_rep_weight'], w_attn=w['attn_weight'], w_rec=w['recon_weight'])
  c.train = dict(accumulate_teacher_grad=True, counterfactual_metrics=False)
  c.model = dict(deterministic=True)
  c.maci = dict(train_tau=1.0)
  return c


def compare(path, kernels='auto'):
  """kernels: model.kernels ('auto': native on the CPU backend when the kernels build)."""
  arrays, meta = load_fixture(path)
  model, params, cross = build(arrays, meta, kernels)
  H = int(meta['hparams']['num_heads'])
  cls_feats, cls_probs = jnp.asarray(arrays['input/cls_feats']), jnp.asarray(arrays['input/cls_probs'])
  full_in = inputs_of(arrays, 'input/text')
  miss_in = inputs_of(arrays, 'input/text_m', '_m')
  cf_in = inputs_of(arrays, 'input/text_cf', '_m')
  run = jax.jit(lambda p, x, rec: model.apply({'params': p}, x, cls_feats, cls_probs,
                                              reconstruct=rec), static_argnums=2)
  full, miss, cf = run(params, full_in, False), run(params, miss_in, True), run(params, cf_in, False)
  flat_scores = lambda s: np.asarray(s).reshape((-1,) + s.shape[2:])
  ours = {
      'output/full/pred': full['logp'], 'output/full/joint_rep': full['joint_rep'],
      'output/full/attn': flat_scores(full['scores']),
      'output/full/text_for_recon': full['text_hidden'],
      'output/missing/pred_m': miss['logp'], 'output/missing/joint_rep_m': miss['joint_rep'],
      'output/missing/attn_m': flat_scores(miss['scores']),
      'output/missing/text_recon': miss['text_recon'],
      'output/missing/audio_recon': miss['audio_recon'],
      'output/missing/vision_recon': miss['vision_recon'],
      'output/test/pred_m': miss['logp'], 'output/test/joint_rep_m': miss['joint_rep'],
      'output/test/attn_m': flat_scores(miss['scores']),
      'output/test/cf_pred_m': cf['logp'], 'output/test/cf_joint_rep_m': cf['joint_rep'],
      'output/test/cf_attn_m': flat_scores(cf['scores']),
  }
  labels = jnp.asarray(arrays['input/labels'], jnp.int32)
  B = labels.shape[0]
  valid = jnp.ones((B,), jnp.float32)
  keeps = tuple(jnp.asarray(arrays[f'input/{m}_keep'], jnp.float32)
                for m in ('text', 'audio', 'vision'))
  dropped = [jnp.asarray(arrays[f'input/{m}_mask'], jnp.float32) - k
             for m, k in zip(('text', 'audio', 'vision'), keeps)]
  ratio = lambda nd, eps=0.0: float(nd[0] / (nd[1] + eps))
  ours.update({
      'loss/loss_task': ratio(losses.nll(full['logp'], labels, valid)),
      'loss/loss_task_m': ratio(losses.nll(miss['logp'], labels, valid)),
      'loss/loss_joint_rep': ratio(losses.representation(miss['joint_rep'], full['joint_rep'], valid)),
      'loss/loss_attn': ratio(losses.attention_kl(full['attn_qk'], miss['attn_qk'], valid)),
      'loss/loss_recon_text': ratio(losses.reconstruction(
          miss['text_recon'], full['text_hidden'], dropped[0]), 1e-6),
      'loss/loss_recon_audio': ratio(losses.reconstruction(
          miss['audio_recon'], full_in['audio'], dropped[1]), 1e-6),
      'loss/loss_recon_vision': ratio(losses.reconstruction(
          miss['vision_recon'], full_in['vision'], dropped[2]), 1e-6),
  })

  # ---------------------------------------------------------------- one training iteration
  config = train_config(meta)
  tx, group = optim.make_optimizer(config.optim, params, bool(meta['hparams']['aligned']))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(0),
                     consts={'cls_feats': cls_feats, 'cls_probs': cls_probs,
                             'bias_table': jnp.zeros((1,), bool)})
  batch = dict(full_in, label=labels, valid=valid)
  step = jax.jit(lambda s, b, k: train_step(s, b, k, model=model, tx=tx, labels=group,
                                            config=config, axis_name=None, return_grads=True))
  new_state, metrics = step(state, batch, keeps)
  ours['loss/train_combined_loss_second_update'] = float(metrics['loss'])

  diffs, tol = {}, {}
  for key, value in ours.items():
    if key in arrays:
      diffs[key] = float(np.max(np.abs(np.asarray(value, np.float64) - arrays[key])))
      tol[key] = OUTPUT_TOL
  after = flax_to_torch(jax.device_get(new_state.params), cross)
  grads, rule = noise_gradients(arrays, metrics['grads'], cross)
  student_only = {k for k in after if k.startswith('recon_')}
  lrs = {k: (meta['adam']['bert_lr'] if k.startswith('text_model.') else meta['adam']['lr'])
         for k in after}
  b1, b2 = meta['adam']['betas']
  noise = {'rule': rule, 'elements': {}}
  for name, value in after.items():
    key = f'param_after_step/{name}'
    if key not in arrays or name in BUFFERS:  # buffers are constants, not parameters
      continue
    ref = arrays[key].astype(np.float64)
    diff = np.abs(value.astype(np.float64) - ref)
    g_t, g_2 = grads(name)
    small = np.abs(g_2) < SMALL_GRAD
    if name not in student_only:
      small |= np.abs(g_t) < SMALL_GRAD
    diffs[key] = float(np.max(np.where(small, 0.0, diff), initial=0.0))
    tol[key] = PARAM_TOL
    noise['elements'][name] = int(small.sum())
    if small.any():
      diffs[key + '_small_grad'] = float(np.max(np.where(small, diff, 0.0), initial=0.0))
      tol[key + '_small_grad'] = noise_tolerance(
          lrs[name], b1, b2, (1,) if name in student_only else (1, 2))
  failed = sorted(k for k in diffs if not diffs[k] <= tol[k])
  return diffs, failed, noise


def noise_gradients(arrays, our_grads, cross):
  """(name -> (teacher gradient, second-update gradient), rule): the gradients that decide
  which elements are float32 noise. The original's (`grad_teacher/NAME`, `grad_second/NAME`)
  when the fixture holds them (rule 'original'); else cider_jax's own (rule 'cider_jax', the
  fallback for fixtures made before the original's gradients were recorded: it cannot see a
  gradient that cider_jax drops where the original has one)."""
  if any(k.startswith('grad_second/') for k in arrays):
    def grads(name):
      keys = (f'grad_teacher/{name}', f'grad_second/{name}')
      missing = [k for k in keys if k not in arrays]
      if missing:
        raise FixtureError(f'the fixture has the original\'s gradients but not {missing[0]}')
      return tuple(arrays[k] for k in keys)
    return grads, 'original'
  g_t, g_2 = (flax_to_torch(jax.device_get(g), cross) for g in our_grads)
  return (lambda name: (g_t[name], g_2[name])), 'cider_jax'


def main(argv):
  args = list(argv[1:])
  kernels = 'auto'
  for i, a in enumerate(args):
    if a.startswith('--kernels'):
      value = a.split('=', 1)[1] if '=' in a else (args[i + 1] if i + 1 < len(args) else '')
      kernels = value
      args = args[:i] + args[i + (1 if '=' in a else 2):]
      break
  if len(args) != 1 or kernels not in ('auto', 'native', 'xla'):
    print('usage: python -m cider_jax.compat.check_reference FIXTURE.npz '
          '[--kernels auto|native|xla]', file=sys.stderr)
    return 2
  try:
    diffs, failed, noise = compare(args[0], kernels)
  except FixtureError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for k in failed:
    print(f'out of tolerance: {k} = {diffs[k]:.3g}', file=sys.stderr)
  source = ("the original's gradients (grad_teacher/, grad_second/)" if noise['rule'] == 'original'
            else "cider_jax's own gradients: the fixture has no grad_teacher/, grad_second/ "
                 '(a gradient cider_jax drops cannot be told from noise; regenerate it)')
  print(f'float32-noise elements judged from {source}: {sum(noise["elements"].values())} in '
        f'{sum(n > 0 for n in noise["elements"].values())} of {len(noise["elements"])} '
        'parameters', file=sys.stderr)
  print(json.dumps({'noise_rule': noise['rule'], 'noise_elements': noise['elements']}))
  print(json.dumps(diffs))
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
