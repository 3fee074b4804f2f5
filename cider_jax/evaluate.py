"""Evaluation of the best checkpoint: every missing mode × rate, factual and debiased.

  report = evaluate(config, workdir)

τ protocol (honest): for every split-independent setting (mode, rate) τ is the value of the
grid maximising the main metric (Non0_acc_2 / Acc_7) on the VALIDATION split under the same
mode and rate (ties → smallest τ); that τ is applied to test. `tau.value` is the τ chosen on
complete validation input. The original's optimistic protocol (every metric at its own best τ
on test) is reported only under `test_oracle`.

A run trained with maci.enabled=False has no counterfactual pass: its report holds the
factual numbers only, says so under `maci`, and has no τ (`tau` null, no `test_oracle`).

Writes <workdir>/eval/: report.json, report.csv, predictions.npz
(`<split>/<mode>/<rate>/{labels,factual,counterfactual}`), metric-vs-rate PNGs. The workdir may
be a Cloud Storage URI (gs://BUCKET/PATH); in a multi-host run every process evaluates and
process 0 writes the files.
"""
import csv
import io
import json
import time
from typing import Any, NamedTuple, Optional

import jax
import numpy as np
from etils import epath

from cider_jax import checkpoint as ckpt_lib
from cider_jax import configuration
from cider_jax import eval_step, masks, metrics, parallel, run_state, tokens
from cider_jax import spec as spec_lib
from cider_jax.data import pipeline, standardize
from cider_jax.models.cider import CIDer


class EvaluationError(RuntimeError):
  pass


class BestCheckpoint(NamedTuple):
  """What `restore_best` returns."""
  model: CIDer
  params: Any                 # numpy arrays
  consts: dict                # the eval step's constants (run_state.eval_consts)
  spec: spec_lib.ModelSpec
  meta: dict                  # the checkpoint's meta, with its 'step'
  special: tokens.SpecialTokens   # the text encoder's special tokens


def check_trained_run(workdir) -> None:
  """A clear error unless `workdir` holds a training run's constants.npz."""
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise EvaluationError(f'workdir {workdir!r} is a file, not a directory: give the folder '
                          'of a training run (--workdir of python launch/train.py)')
  if not path.is_dir():
    raise EvaluationError(f'workdir {workdir!r} does not exist: train first with '
                          f'python launch/train.py --config … --workdir {workdir}')
  cpath = epath.Path(workdir) / 'constants.npz'
  if not cpath.exists():
    raise EvaluationError(f'{cpath} is missing: {workdir!r} holds no finished training run')


def restore_best(config, workdir, train_split=None,
                 special: Optional[tokens.SpecialTokens] = None) -> BestCheckpoint:
  """The model, parameters and eval constants of the best checkpoint of a workdir.

  Only the parameters (and step) are read: no optimizer state is built or allocated. With
  `train_split`, a bias vocabulary cached under other config.maci settings is recomputed;
  without it, such a mismatch is an error. special: the text encoder's special tokens, read
  from its folder when not given.
  """
  check_trained_run(workdir)
  ckpts = ckpt_lib.Checkpoints(workdir)
  meta = ckpts.read_meta('best', required=('spec',))
  if meta is None:
    raise EvaluationError(f'no checkpoint in {ckpts.root}/best: train first (or the run was '
                          'stopped before its first validation)')
  ckpt_lib.check_compatible(meta, config)
  try:
    spec = ckpt_lib.spec_from_json(meta['spec'])
  except (KeyError, TypeError, ValueError) as e:
    raise ckpts.damaged('best', ckpts.best.latest_step(), f'holds an unreadable spec '
                        f'({type(e).__name__}: {e})') from e
  bert_config = spec_lib.text_encoder_config(config)
  special = special or run_state.special_tokens(config)
  c = run_state.with_feature_stats(_run_constants(config, workdir, train_split, special),
                                   *spec.feature_dims)
  vocab_size = bert_config.vocab_size
  shapes = jax.eval_shape(lambda: run_state.train_consts(c, vocab_size, special))
  restored = run_state.restore_params(ckpts, 'best', config, spec, bert_config, shapes)
  return BestCheckpoint(restored.model, restored.params,
                        run_state.eval_consts(c, vocab_size, spec.num_classes, special), spec,
                        {**restored.meta, 'step': restored.step}, special)


def _run_constants(config, workdir, train_split, special) -> dict:
  """The run's constants.npz, its bias vocabulary recomputed for other config.maci settings
  from `train_split` (an error without it)."""
  cpath = epath.Path(workdir) / 'constants.npz'
  c = run_state.read_constants(cpath)
  if train_split is not None:
    return run_state.with_bias_vocab(config, c, train_split, special)
  if 'maci_top_k' in c and not run_state.bias_vocab_matches(config, c):
    raise EvaluationError(f'{cpath} holds the bias vocabulary of maci.top_k='
                          f'{int(c["maci_top_k"])}, maci.cv_threshold='
                          f'{float(c["maci_cv_threshold"]):g}, the configuration asks for '
                          f'{config.maci.top_k}, {config.maci.cv_threshold:g}; evaluate with '
                          'the train split loaded (launch/evaluate.py) to recompute it')
  return c


def read_tau(workdir) -> Optional[float]:
  """The τ of a run's evaluation (tau.value of <workdir>/eval/report.json, chosen on the
  validation split), or None when the run has no report or the report no τ (maci.enabled=
  False). A report that is not JSON, or whose τ is not a finite number >= 0, raises
  EvaluationError naming the file and what to do."""
  path = epath.Path(workdir) / 'eval' / 'report.json'
  if not path.exists():
    return None
  remedy = (f'delete it and run python launch/evaluate.py --config … --workdir {workdir} to '
            'write it again')
  try:
    report = json.loads(path.read_bytes())
  except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
    raise EvaluationError(f'{path} is not a valid report ({" ".join(str(e).split())[:120]}); '
                          f'{remedy}') from None
  if not isinstance(report, dict):
    raise EvaluationError(f'{path} holds a JSON {type(report).__name__}, not a report (an '
                          f'object); {remedy}')
  tau = report.get('tau')
  if tau is not None and not isinstance(tau, dict):
    raise EvaluationError(f'{path}: its tau is {tau!r:.60}, not an object with a value; '
                          f'{remedy}')
  value = None if tau is None else tau.get('value')
  if value is None:
    return None
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value)
      or value < 0):
    raise EvaluationError(f'{path}: tau.value is {value!r:.60}; expected a finite number >= 0 '
                          f'(the τ chosen on validation); {remedy}')
  return float(value)


def _settings(config):
  """[(group, mode, label, rate)]: the configured modes × rates, then specific-modality cases."""
  out = [('modes', m, r, r) for m in config.eval.modes for r in config.eval.rates]
  out += [('specific_modality', 'RMFM_same', name, rates)
          for name, rates in masks.SPECIFIC_MODALITY_RATES.items()]
  return out


def predict_all(config, model, params, consts, splits, spec,
                special: tokens.SpecialTokens = tokens.BERT):
  """{(split, group, mode, label): {'labels', 'factual', 'counterfactual'}} over all settings."""
  n_dev = jax.local_device_count()
  batch = -(-config.train.eval_batch_size // n_dev) * n_dev
  eval_fn = eval_step.make_eval_step(model, axis_name='batch', special=special)
  r_params, r_consts = parallel.replicate(params), parallel.replicate(consts)
  settings = _settings(config)
  preds, t0 = {}, time.time()
  for split_name in ('valid', 'test'):
    split = splits[split_name]
    labels = split.labels(config.task)
    for i, (group, mode, label, rate) in enumerate(settings):
      keeps = masks.test_keep(mode, rate, split.text_mask, split.audio_mask, split.vision_mask,
                              seed=config.eval.seed, aligned=spec.aligned)
      out = eval_step.run_batches(eval_fn, r_params, r_consts,
                                  pipeline.eval_batches(split, batch, config.task, keeps=keeps),
                                  n_devices=n_dev)
      preds[(split_name, group, mode, label)] = {'labels': labels, 'factual': out['logp'],
                                                 'counterfactual': out.get('logp_cf')}
      print(f'\r{split_name}: {i + 1}/{len(settings)} settings ({time.time() - t0:.0f} s)',
            end='', flush=True)
    print(flush=True)
  return preds


def _finite(d):
  return {k: (None if v is None or not np.isfinite(v) else float(v)) for k, v in d.items()}


def build_report(config, preds):
  """(report, csv rows) of the predictions; without counterfactual predictions (MACI
  disabled) the factual numbers only, as `report['maci']` says."""
  if any(p['counterfactual'] is None for p in preds.values()):
    return _factual_report(config, preds)
  task, main = config.task, metrics.main_metric(config.task)
  taus = metrics.tau_grid(*config.maci.tau_grid)
  report = {'task': task, 'main_metric': main, 'tau_grid': taus.tolist(),
            'maci': {'enabled': True}, 'modes': {}, 'specific_modality': {}, 'valid': {},
            'test_oracle': {}}
  per_setting_tau = {}
  rows = []
  for (split, group, mode, label), p in preds.items():
    if split != 'test':
      continue
    v = preds[('valid', group, mode, label)]
    tau, _ = metrics.select_tau(v['factual'], v['counterfactual'], v['labels'], task, taus)
    key = f'{mode}@{label}' if group == 'modes' else label
    per_setting_tau[key] = float(tau)
    entries = {}
    for sp, q in (('test', p), ('valid', v)):
      fact = metrics.classification_metrics(q['factual'], q['labels'], task)
      deb = metrics.debiased_metrics(q['factual'], q['counterfactual'], q['labels'], task, tau)
      entries[sp] = (fact, deb)
      for variant, m in (('factual', fact), ('debiased', deb)):
        rows.append(dict(split=sp, group=group, mode=mode, rate=label, variant=variant, tau=tau
                         if variant == 'debiased' else 0.0, **m))
    if group == 'modes' and float(label) == 0.0 and 'counterfactual' not in report['maci']:
      report['maci']['counterfactual'] = dict(
          metrics.counterfactual_summary(p['factual'], p['counterfactual']),
          setting=f'test, {mode}, complete input')
    per_tau = metrics.metrics_per_tau(p['factual'], p['counterfactual'], p['labels'], task, taus)
    oracle = {k: float(np.nanmax(a)) for k, a in per_tau.items()}
    if group == 'modes':
      for target, sp in ((report['modes'], 'test'), (report['valid'], 'valid')):
        m = target.setdefault(mode, {'rates': [], 'tau': [], 'factual': {}, 'debiased': {}})
        m['rates'].append(float(label))
        m['tau'].append(float(tau))
        fact, deb = entries[sp]
        for name in fact:
          m['factual'].setdefault(name, []).append(fact[name])
          m['debiased'].setdefault(name, []).append(deb[name])
      o = report['test_oracle'].setdefault(mode, {'rates': [], 'best_over_tau': {}})
      o['rates'].append(float(label))
      for name, val in oracle.items():
        o['best_over_tau'].setdefault(name, []).append(val)
    else:
      fact, deb = entries['test']
      report['specific_modality'][label] = {'keeps': label, 'tau': float(tau),
                                            'factual': _finite(fact), 'debiased': _finite(deb)}
  for target in (report['modes'], report['valid']):
    for mode, m in target.items():
      m['auilc'] = {}
      if 0.0 in m['rates'] and 1.0 in m['rates']:
        m['auilc'] = {variant: {name: metrics.auilc(m['rates'], vals)
                                for name, vals in m[variant].items()}
                      for variant in ('factual', 'debiased')}
  complete = next((k for k in per_setting_tau if k.endswith('@0.0')), None)
  report['tau'] = {'selected_on': 'valid', 'metric': main,
                   'value': per_setting_tau.get(complete),
                   'rule': 'per (mode, rate): the grid value maximising the main metric on the '
                           'validation split under the same mode and rate; value = complete input',
                   'per_setting': per_setting_tau}
  return report, rows


FACTUAL_ONLY = ('maci.enabled=False: the base model with a plain linear head and no '
                'counterfactual pass; every number is factual (no debiasing, no tau)')


def _factual_report(config, preds):
  """build_report for factual predictions only (MACI disabled)."""
  task, main = config.task, metrics.main_metric(config.task)
  report = {'task': task, 'main_metric': main, 'maci': {'enabled': False, 'note': FACTUAL_ONLY},
            'modes': {}, 'specific_modality': {}, 'valid': {}, 'tau': None}
  rows = []
  for (split, group, mode, label), p in preds.items():
    fact = metrics.classification_metrics(p['factual'], p['labels'], task)
    rows.append(dict(split=split, group=group, mode=mode, rate=label, variant='factual',
                     tau=0.0, **fact))
    if group == 'modes':
      target = report['modes'] if split == 'test' else report['valid']
      m = target.setdefault(mode, {'rates': [], 'factual': {}})
      m['rates'].append(float(label))
      for name, val in fact.items():
        m['factual'].setdefault(name, []).append(val)
    elif split == 'test':
      report['specific_modality'][label] = {'keeps': label, 'factual': _finite(fact)}
  for target in (report['modes'], report['valid']):
    for m in target.values():
      m['auilc'] = {}
      if 0.0 in m['rates'] and 1.0 in m['rates']:
        m['auilc'] = {'factual': {name: metrics.auilc(m['rates'], vals)
                                  for name, vals in m['factual'].items()}}
  return report, rows


def _json_safe(x):
  """NaN (a metric over no example, e.g. Non0 with only neutral samples) → null."""
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, float) and not np.isfinite(x):
    return None
  return x


def write_outputs(out_dir, report, rows, preds):
  """report.json, report.csv, predictions.npz and plots in out_dir (local or gs://), written
  by process 0 only (every process of a multi-host run holds the same predictions)."""
  if not ckpt_lib.is_writer():
    return
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  ckpt_lib.write_text(out_dir / 'report.json', json.dumps(_json_safe(report), indent=1))
  keys = list(rows[0].keys())
  for r in rows:
    keys += [k for k in r if k not in keys]
  table = io.StringIO(newline='')
  w = csv.DictWriter(table, fieldnames=keys)
  w.writeheader()
  w.writerows(rows)
  ckpt_lib.write_text(out_dir / 'report.csv', table.getvalue())
  arrays = {}
  for (split, group, mode, label), p in preds.items():
    name = f'{split}/{mode}/{float(label):.1f}' if group == 'modes' else f'{split}/SMM_{label}'
    for k in ('labels', 'factual', 'counterfactual'):
      if p[k] is not None:
        arrays[f'{name}/{k}'] = np.asarray(p[k])
  ckpt_lib.write_npz(out_dir / 'predictions.npz', arrays, compressed=True)
  _plot(out_dir, report)


def _plot(out_dir, report):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  main = report['main_metric']
  for metric in sorted({main, 'Acc_3' if report['task'] == 'binary' else 'F1_7'}):
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (mode, m) in enumerate(report['modes'].items()):
      color = f'C{i}'
      ax.plot(m['rates'], m['factual'][metric], '-o', color=color, ms=3, label=f'{mode} factual')
      if 'debiased' in m:
        ax.plot(m['rates'], m['debiased'][metric], '--s', color=color, ms=3,
                label=f'{mode} debiased')
    title = f'test {metric} (τ chosen on valid)' if 'debiased' in m else f'test {metric} (factual)'
    ax.set(xlabel='missing rate', ylabel=metric, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    ckpt_lib.write_figure(fig, epath.Path(out_dir) / f'{metric}_vs_rate.png', dpi=110)
    plt.close(fig)


def format_table(report) -> str:
  main = report['main_metric']
  head = (f'test {main} (τ per setting, chosen on validation; complete-input τ = '
          f'{report["tau"]["value"]})' if report['tau'] else
          f'test {main}, factual only (maci.enabled=False: no counterfactual pass)')
  lines = [head,
           f'{"mode":<10} {"complete":>17} {"50% missing":>17} {"AUILC":>17}',
           f'{"":<10} {"fact":>8} {"debias":>8} {"fact":>8} {"debias":>8} {"fact":>8} {"debias":>8}']
  for mode, m in report['modes'].items():
    def at(rate, variant):
      if rate not in m['rates'] or variant not in m:
        return float('nan')
      return m[variant][main][m['rates'].index(rate)]
    auc = lambda v: m['auilc'].get(v, {}).get(main, float('nan'))
    lines.append(f'{mode:<10} {at(0.0, "factual"):8.4f} {at(0.0, "debiased"):8.4f} '
                 f'{at(0.5, "factual"):8.4f} {at(0.5, "debiased"):8.4f} '
                 f'{auc("factual"):8.4f} {auc("debiased"):8.4f}')
  return '\n'.join(lines)


def evaluate(config, workdir: str) -> dict:
  """Restore the best checkpoint of `workdir`, evaluate, write <workdir>/eval/, return report.

  A configuration or workdir that cannot be used raises ConfigError (configuration.validate),
  except a missing mode of eval.modes that the data cannot take: EvaluationError.
  """
  try:
    configuration.validate(config, workdir=workdir, check_devices=False)
  except configuration.ConfigError as e:
    if e.field and e.field.startswith('eval.modes'):
      raise EvaluationError(str(e)) from e
    raise
  check_trained_run(workdir)
  special = run_state.special_tokens(config)
  splits = pipeline.load_splits(config, workdir, special)
  best = restore_best(config, workdir, splits['train'], special)
  print(f'evaluating the best checkpoint (epoch {best.meta.get("best_epoch")}, step '
        f'{best.meta["step"]}) of {workdir}', flush=True)
  return evaluate_model(config, workdir, best.model, best.params, best.consts, splits,
                        best.spec, special, {'best_epoch': best.meta.get('best_epoch'),
                                             'best_valid': best.meta.get('best'),
                                             'selected_on': selected_on(best.meta)})


def selected_on(meta: dict) -> str:
  """Which prediction's validation score picked a checkpoint: 'debiased' or 'factual'
  (train.select_on of the run's saved config; runs saved before that option: 'factual')."""
  saved = meta.get('config') or {}
  rule = saved.get('train', {}).get('select_on')
  if rule is None:
    return 'factual'
  return configuration.selection_rule(rule, saved.get('maci', {}).get('enabled', True))


def evaluate_model(config, workdir, model, params, consts, splits, spec, special,
                   checkpoint: dict) -> dict:
  """Evaluates `model` with `params` and eval constants `consts` on the valid and test splits;
  writes <workdir>/eval/ and returns the report (`checkpoint` describes the weights)."""
  preds = predict_all(config, model, params, consts, splits, spec, special)
  report, rows = build_report(config, preds)
  report['checkpoint'] = checkpoint
  out_dir = epath.Path(workdir) / 'eval'
  write_outputs(out_dir, report, rows, preds)
  print(format_table(report), flush=True)
  print(f'wrote {out_dir}/report.json, report.csv, predictions.npz and plots', flush=True)
  return report


def evaluate_original(config, workdir: str, weights: str) -> dict:
  """Evaluates the original's trained weights (an export of python -m
  cider_jax.compat.export_original) on the config's data, as a cider_jax run is evaluated:
  every mode and rate, τ on validation, `test_oracle` beside it; writes <workdir>/eval/ and
  <workdir>/constants.npz (prototypes, prior and bias vocabulary of the train split).

  The inputs are fed raw (data.standardize=False), as the original was trained on them.
  """
  from cider_jax.compat import original  # pylint: disable=g-import-not-at-top
  from cider_jax.models import bert  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.data.standardize = False
  configuration.validate(config, workdir=workdir, check_devices=False)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  model, variables = original.load_original(weights, config.model.kernels)
  special = run_state.special_tokens(config)
  splits = pipeline.load_splits(config, workdir, special)
  spec = spec_lib.spec_from_split(splits['train'], config)
  check_fits(weights, model, spec, config)
  run_state.check_token_ids(splits, model.base.bert.vocab_size)
  encoder, encoder_vars = bert.load_pretrained(config.model.text_encoder.path,
                                               config.model.text_encoder.num_layers)
  if encoder.config.hidden_size != model.feature_dims[0]:
    raise original.OriginalWeightsError(
        f'{weights}: hparams.orig_d_l is {model.feature_dims[0]}, the text encoder at '
        f'config.model.text_encoder.path has hidden size {encoder.config.hidden_size} (its '
        'features make the class prototypes): point it at the BERT the weights were trained '
        'from')
  c = run_state.constants(config, splits, spec, encoder, encoder_vars, workdir, special)
  if not standardize.is_identity(c):
    raise EvaluationError(f'{workdir}/constants.npz holds standardisation statistics of a '
                          'cider_jax run: evaluate the original weights in a fresh workdir')
  consts = run_state.eval_consts(c, model.base.bert.vocab_size, spec.num_classes, special)
  print(f'evaluating the original weights {weights}', flush=True)
  return evaluate_model(config, workdir, model, variables['params'], consts, splits, spec,
                        special, {'original_weights': str(weights)})


def check_fits(weights, model, spec, config) -> None:
  """OriginalWeightsError naming the field where the weights and the data / config differ."""
  from cider_jax.compat import original  # pylint: disable=g-import-not-at-top
  L, La, Lv = model.base.seq_lens
  Dl, Da, Dv = model.feature_dims
  checks = [('hparams.l_len', L, 'the text length of the data is', spec.seq_lens[0]),
            ('hparams.orig_d_a', Da, 'the audio feature size of the data is',
             spec.feature_dims[0]),
            ('hparams.orig_d_v', Dv, 'the vision feature size of the data is',
             spec.feature_dims[1]),
            ('hparams.aligned', model.base.aligned, 'config.data.aligned is', spec.aligned),
            ('hparams.output_dim', model.num_classes,
             f'the classes of config.task {config.task!r} are', spec.num_classes)]
  if not spec.aligned:
    checks += [('hparams.a_len', La, 'the audio frames of the data are', spec.seq_lens[1]),
               ('hparams.v_len', Lv, 'the vision frames of the data are', spec.seq_lens[2])]
  for field, theirs, what, ours in checks:
    if theirs != ours:
      raise original.OriginalWeightsError(f'{weights}: {field} is {theirs}, {what} {ours}')
