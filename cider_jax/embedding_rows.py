"""The word-embedding table's updates taken row-wise (a form of updates.py, same values).

The table (vocabulary × hidden) is most of BERT's parameters, but an iteration's gradients
reach only the rows of its token ids. Its Adam updates still change every row (weight decay
and the moments), so the dense form forms a gradient table for every update, reads it for
the global norm and runs a pass over the table and both moments per update. Here the model
reads the rows of its ids instead of the table (`word_rows`); their cotangents are summed per
distinct id (the ids of every pass, over all devices); each update changes those rows with
their gradients (the table group's optax transform); and the table and its moments take all
the iteration's updates with zero gradients in one go, after which the rows of those ids are
overwritten with their own updates.
"""
import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from cider_jax import optim

PATH = ('text_encoder', 'embeddings', 'word_embeddings', 'embedding')
GROUP = 'bert_decay'   # optim.param_labels' group of the table


def present(params) -> bool:
  node = params
  for key in PATH:
    if not isinstance(node, dict) or key not in node:
      return False
    node = node[key]
  return True


def get(tree):
  for key in PATH:
    tree = tree[key]
  return tree


def replace(tree, value, path: Sequence[str] = PATH):
  """A copy of the nested dicts along `path` with the leaf there set to value."""
  out = dict(tree)
  out[path[0]] = value if len(path) == 1 else replace(tree[path[0]], value, path[1:])
  return out


def placeholder(table):
  """The (0, H) stand-in for the table in the trees optax and the model see."""
  return jnp.zeros((0,) + table.shape[1:], table.dtype)


def _with_moments(opt_state, mu, nu):
  return optim.with_adam_state(
      opt_state, GROUP, lambda a: a._replace(mu=replace(a.mu, mu), nu=replace(a.nu, nu)))


def union(parts, vocab: int):
  """The distinct ids of the flattened parts (each (n_i,) int32): (ids (U,) padded with
  `vocab`, per part the slot (n_i,) of each of its ids)."""
  flat = jnp.concatenate(parts)
  ids, inverse = jnp.unique(flat, size=flat.shape[0], fill_value=vocab, return_inverse=True)
  inverse = inverse.reshape(-1)
  out, start = [], 0
  for p in parts:
    out.append(inverse[start:start + p.shape[0]])
    start += p.shape[0]
  return ids, tuple(out)


def adam_step(cfg, p, m, v, g, count, scale=1.0):
  """One update of the table group's optax transform on rows p with moments m, v after
  `count` updates, its learning rate times `scale`: (p + scale · update, m, v, count + 1)."""
  tx = optim.group_transforms(cfg)[GROUP]
  chain = tx.init(p)
  i, _ = optim.adam_state(chain)
  inner = list(chain)
  inner[i] = optax.ScaleByAdamState(count=count, mu=m, nu=v)
  updates, new = tx.update(g, tuple(inner), p)
  return p + scale * updates, new[i].mu, new[i].nu, new[i].count


def table_zero_updates(table, mu, nu, ids, count, steps: int, *, cfg, group: str = GROUP,
                       lead: bool = False, scale=1.0):
  """The table's `steps` updates with zero gradients (learning rate times `scale`), and the
  rows `ids` (clipped into the table) of the table and its moments before them: (table, mu,
  nu, rows, mu rows, nu rows). lead: unused here (the in-place form, kernels/adam.py, has the
  same signature)."""
  del group, lead
  rows = tuple(jnp.take(t, ids, axis=0, mode='clip') for t in (table, mu, nu))
  zero = jnp.zeros_like(table)
  for _ in range(steps):
    table, mu, nu, count = adam_step(cfg, table, mu, nu, zero, count, scale)
  return (table, mu, nu) + rows


@dataclasses.dataclass(frozen=True)
class Rows:
  """The table's part of one train step: the rows of the step's distinct ids and their Adam
  state, the table already taken through the iteration's zero-gradient updates."""
  cfg: Any
  ids: jax.Array         # (U,) distinct ids, padded with the vocabulary size
  local: tuple           # per pass, (B·L,) slot of each of this device's ids
  shape: tuple           # (B, L, H)
  updated: tuple         # (table, mu, nu) after the zero-gradient updates
  p: jax.Array           # (U, H) rows, and their moments and update count
  m: jax.Array
  v: jax.Array
  count: jax.Array
  scale: Any             # the learning-rate schedule's factor at this step

  @classmethod
  def begin(cls, params, opt_state, ids, cfg, axis_name, zero_updates, steps=2, lead=False,
            scale=1.0):
    """ids: per pass (B, L) token ids. zero_updates: `table_zero_updates` or its in-place
    form; scale: the schedule's factor of the learning rate (optim.lr_factor). Returns (rows,
    params and opt_state with the table replaced by a stand-in)."""
    table = get(params)
    adam = optim.group_adam_state(opt_state, GROUP)
    B, L = ids[0].shape
    device, flat = 0, [i.reshape(-1) for i in ids]
    if axis_name and jax.lax.axis_size(axis_name) > 1:
      device = jax.lax.axis_index(axis_name)
      flat = [jax.lax.all_gather(i, axis_name).reshape(-1) for i in ids]
    distinct, inverse = union(flat, table.shape[0])
    local = tuple(inv.reshape(-1, B * L)[device] for inv in inverse)
    *updated, p, m, v = zero_updates(table, get(adam.mu), get(adam.nu), distinct, adam.count,
                                     steps, cfg=cfg, group=GROUP, lead=lead, scale=scale)
    ph = placeholder(table)
    rows = cls(cfg, distinct, local, (B, L, table.shape[1]), tuple(updated), p, m, v,
               adam.count, scale)
    return rows, replace(params, ph), _with_moments(opt_state, ph, ph)

  def word_rows(self, slots, part: int):
    """(B, L, H): the rows of pass `part`'s ids, from slots (U, H)."""
    return jnp.take(slots, self.local[part], axis=0).reshape(self.shape)

  def zero_padding(self, grads):
    """The padding id 0 receives no gradient (torch padding_idx)."""
    return jnp.where((self.ids == 0)[:, None], 0.0, grads)

  def update(self, grads):
    """One update of the rows for their (clipped) gradients."""
    p, m, v, count = adam_step(self.cfg, self.p, self.m, self.v, grads, self.count,
                               self.scale)
    return dataclasses.replace(self, p=p, m=m, v=v, count=count)

  def finish(self, params, opt_state):
    """params and opt_state with the table and its moments: the zero-gradient updates over
    the whole table, the rows' own updates written over theirs."""
    p, m, v = (t.at[self.ids].set(r, mode='drop')
               for t, r in zip(self.updated, (self.p, self.m, self.v)))
    return replace(params, p), _with_moments(opt_state, m, v)

  def dense_grads(self, tree, slot_grads):
    """tree with the (V, H) table gradient the dense form would have (for tests)."""
    table = self.updated[0]
    return replace(tree, jnp.zeros_like(table).at[self.ids].add(slot_grads, mode='drop'))
