"""Time the original PyTorch CIDer's training iteration, for comparison with launch/bench.py.

Runs in the original's own environment (torch, transformers, numpy), never in cider_jax's, and
imports the original's model from a checkout of it (GitHub gw-zhong/CIDer) given by the user:

  python launch/bench_original.py --original_src DIR                     # MiniLM-size BERT
  python launch/bench_original.py --original_src DIR --bert_hidden 48 --bert_layers 1 --bert_heads 2

One iteration is what the original's train.py does per batch: the teacher pass on the complete
input, NLL, backward, Adam step; then the student pass on the masked input (the task NLL, the
representation, attention-distillation and masked reconstruction terms with cider_jax's default
weights), backward without clearing the teacher's gradients, Adam step. Shapes and settings are
launch/bench.py's defaults: batch 32, MOSI unaligned (L 50, La 375, Lv 500, Da 5, Dv 20;
--aligned 50/50/50), embed 32, 8 heads, 3 layers, 3 classes, the Adam groups of the paper
(BERT 5e-5 with L2 1e-3 on weights, the rest 1e-3). The BERT is randomly initialised at the
given size (the original loads bert-base from a fixed path; no weights are read). Prints one
JSON line with ms_per_iter (median of --steps after --warmup untimed iterations) and
samples_per_s; --out also writes it to a file.

Run it back to back with launch/bench.py at the same shapes and threads: timings on shared
machines drift by ±5 % to ±30 % between runs (docs/performance.md).
"""
import argparse
import json
import os
import sys
import time
import types


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--original_src', required=True,
                 help='a checkout of the original code (the folder holding src/models.py)')
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--bert_hidden', type=int, default=384)
  p.add_argument('--bert_layers', type=int, default=6)
  p.add_argument('--bert_heads', type=int, default=12)
  p.add_argument('--aligned', action='store_true', help='word-aligned shapes (50/50/50)')
  p.add_argument('--steps', type=int, default=5, help='timed iterations')
  p.add_argument('--warmup', type=int, default=1, help='untimed iterations first')
  p.add_argument('--threads', type=int, default=2, help='torch intra-op threads')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', help='also write the JSON line to this file')
  return p.parse_args(argv)


def import_original(src: str):
  """The original's src.models module, importable without its training-only dependencies."""
  if not os.path.isfile(os.path.join(src, 'src', 'models.py')):
    sys.exit(f'error: --original_src {src!r} has no src/models.py: give a checkout of the '
             'original CIDer code (GitHub gw-zhong/CIDer)')
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import transformers  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    sys.exit(f'error: {e.name} is not installed: run this in the original\'s environment '
             '(torch, transformers, numpy), not cider_jax\'s')
  sys.path.insert(0, os.path.abspath(src))
  import src.models as models  # pylint: disable=g-import-not-at-top
  return models


def random_bert_encoder(models, hidden: int, layers: int, heads: int):
  """Replaces the original's BertTextEncoder constructor (which reads bert-base from a fixed
  path) with a randomly initialised BERT of the given size; its forward is the original's."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import BertConfig, BertModel  # pylint: disable=g-import-not-at-top
  config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=4 * hidden)

  def init(self, language='en'):
    torch.nn.Module.__init__(self)
    self.model = BertModel(config, add_pooling_layer=False)
  models.BertTextEncoder.__init__ = init


def masked_smooth_l1(pred, target, mask):
  """Σ SmoothL1 over the masked positions / (their count + 1e-6), the reconstruction term."""
  import torch  # pylint: disable=g-import-not-at-top
  m = mask.unsqueeze(-1).expand_as(pred).float()
  loss = torch.nn.functional.smooth_l1_loss(pred * m, target * m, reduction='sum')
  return loss / (m.sum() + 1e-6)


def make_iteration(models, args):
  """(iteration function, model): one training iteration on fixed random inputs."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  torch.manual_seed(args.seed)
  rng = np.random.RandomState(args.seed)
  B, L, Da, Dv = args.batch, 50, 5, 20
  La, Lv = (L, L) if args.aligned else (375, 500)
  hp = types.SimpleNamespace(
      l_len=L, a_len=La, v_len=Lv, orig_d_l=args.bert_hidden, orig_d_a=Da, orig_d_v=Dv,
      embed_dim=32, num_heads=8, multimodal_layers=3, attn_dropout=0.0, relu_dropout=0.1,
      res_dropout=0.1, out_dropout=0.3, embed_dropout=0.2, language='en', distribute=False,
      aligned=args.aligned, output_dim=3, cross_dataset=False)
  model = models.CIDERModel(hp)

  lengths = rng.randint(10, L + 1, size=B)
  t_mask = torch.tensor((np.arange(L)[None] < lengths[:, None]).astype(np.float32))
  ids = torch.tensor(rng.randint(1000, 30000, size=(B, L)))
  ids[:, 0] = 101
  ids[torch.arange(B), torch.tensor(lengths - 1)] = 102
  ids = ids * t_mask.long()
  keep_t = torch.tensor((rng.rand(B, L) > 0.5).astype(np.float32)) * t_mask
  ids_m = (ids * keep_t.long() + 100 * (t_mask - keep_t).long())   # dropped words → [UNK]
  rows = lambda i: torch.stack([i.float(), t_mask, torch.zeros(B, L)], 1)
  audio, vision = torch.randn(B, La, Da), torch.randn(B, Lv, Dv)
  a_mask, v_mask = torch.ones(B, La), torch.ones(B, Lv)
  keep_a = (torch.rand(B, La) > 0.5).float()
  keep_v = (torch.rand(B, Lv) > 0.5).float()
  inputs = dict(
      text=(rows(ids), rows(ids_m), None), audio=(audio, audio * keep_a[..., None]),
      vision=(vision, vision * keep_v[..., None]), input_masks=(t_mask, a_mask, v_mask),
      text_lengths=torch.tensor(lengths),
      cls_feats=[0.1 * torch.randn(B, args.bert_hidden + Da + Dv) for _ in range(3)],
      cls_probs=torch.full((B, 3), 1 / 3), device='cpu', test=False)
  y = torch.tensor(rng.randint(0, 3, size=B))

  bert = list(model.text_model.named_parameters())
  no_decay = lambda n: any(k in n for k in ('bias', 'LayerNorm.bias', 'LayerNorm.weight'))
  optimizer = torch.optim.Adam([
      {'params': [p for n, p in bert if not no_decay(n)], 'weight_decay': 1e-3, 'lr': 5e-5},
      {'params': [p for n, p in bert if no_decay(n)], 'weight_decay': 0.0, 'lr': 5e-5},
      {'params': [p for n, p in model.named_parameters() if 'text_model' not in n],
       'weight_decay': 0.0, 'lr': 1e-3}])
  model.train()

  def iteration():
    model.zero_grad()
    teacher = model(**inputs, missing=False)
    F.nll_loss(teacher['pred'], y).backward()
    optimizer.step()
    student = model(**inputs, missing=True)
    rep = 1 - F.cosine_similarity(student['joint_rep_m'], teacher['joint_rep'].detach(),
                                  dim=-1).mean()
    attn = F.kl_div(F.log_softmax(student['attn_m'], -1),
                    F.softmax(teacher['attn'].detach(), -1), reduction='batchmean')
    rec = (masked_smooth_l1(student['text_recon'], teacher['text_for_recon'], t_mask - keep_t)
           + masked_smooth_l1(student['audio_recon'], audio, a_mask - keep_a)
           + masked_smooth_l1(student['vision_recon'], vision, v_mask - keep_v))
    loss = F.nll_loss(student['pred_m'], y) + 0.5 * rep + 0.1 * attn + 0.6 * rec
    loss.backward()                      # the teacher's gradients are still there
    optimizer.step()
    return loss.item()
  return iteration


def main(argv=None):
  args = parse(argv)
  models = import_original(args.original_src)
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  random_bert_encoder(models, args.bert_hidden, args.bert_layers, args.bert_heads)
  iteration = make_iteration(models, args)
  for _ in range(args.warmup):
    iteration()
  times = []
  for i in range(args.steps):
    t0 = time.perf_counter()
    loss = iteration()
    times.append(time.perf_counter() - t0)
    print(f'step {i + 1}/{args.steps}: {1000 * times[-1]:.0f} ms (loss {loss:.4f})',
          file=sys.stderr, flush=True)
  ms = 1000 * float(np.median(times))
  line = json.dumps({'impl': 'original-pytorch', 'torch': torch.__version__,
                     'batch': args.batch, 'aligned': args.aligned,
                     'bert_hidden': args.bert_hidden, 'bert_layers': args.bert_layers,
                     'bert_heads': args.bert_heads, 'threads': args.threads,
                     'steps': args.steps, 'ms_per_iter': round(ms, 1),
                     'samples_per_s': round(args.batch / ms * 1000, 2)})
  print(line, flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(line + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
