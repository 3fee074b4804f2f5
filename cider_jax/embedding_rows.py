"""The word-embedding table's two Adam updates of an iteration, taken row-wise (REFERENCE §4).

The table (vocabulary × hidden) is most of BERT's parameters, but an iteration's gradients
reach only the rows of its token ids. Its Adam updates still change every row (weight decay
and the moments), so the dense form forms a gradient table twice, reads it for the global
norm and runs two passes over the table and both moments. Here the model reads the rows of
its ids (`word_rows`) instead of the table; their cotangents are summed per distinct id (the
ids of the teacher, student and counterfactual inputs, over all devices); the first update's
rows feed the student pass; and the table and its moments go from θ0 to θ2 in one pass with
zero gradients, after which the rows of those ids are overwritten with both updates taken
with their gradients, each update by the table's group transform (optim.group_transforms).
"""
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from cider_jax import optim
from cider_jax.kernels import adam as native_adam

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


def _adam(opt_state):
  return optim.adam_state(opt_state.inner_states[GROUP].inner_state)


def moments(opt_state):
  """(count, mu, nu) of the table in its group's Adam state (count: updates so far)."""
  _, adam = _adam(opt_state)
  return adam.count, get(adam.mu), get(adam.nu)


def with_moments(opt_state, mu, nu):
  i, adam = _adam(opt_state)
  masked = opt_state.inner_states[GROUP]
  inner = list(masked.inner_state)
  inner[i] = adam._replace(mu=replace(adam.mu, mu), nu=replace(adam.nu, nu))
  states = dict(opt_state.inner_states)
  states[GROUP] = masked._replace(inner_state=tuple(inner))
  return opt_state._replace(inner_states=states)


class Union(NamedTuple):
  ids: jax.Array        # (U,) distinct ids, then `vocab` for the unused slots
  inverse: tuple        # per part: (n_i,) slot of each id


def union(parts, vocab: int) -> Union:
  """The distinct ids of the flattened parts (each (n_i,) int32)."""
  flat = jnp.concatenate(parts)
  ids, inverse = jnp.unique(flat, size=flat.shape[0], fill_value=vocab, return_inverse=True)
  inverse = inverse.reshape(-1)
  out, start = [], 0
  for p in parts:
    out.append(inverse[start:start + p.shape[0]])
    start += p.shape[0]
  return Union(ids, tuple(out))


def zero_padding_slot(u: Union, grads):
  """The padding id 0 receives no gradient (torch padding_idx)."""
  return jnp.where((u.ids == 0)[:, None], 0.0, grads)


def gather_slots(table, u: Union):
  return jnp.take(table, u.ids, axis=0, mode='clip')


def scatter_slots(table, u: Union, rows):
  """table with the rows of u's ids set (its unused slots, id = vocabulary, are dropped)."""
  return table.at[u.ids].set(rows, mode='drop')


class Step:
  """The table's part of one train step (train_step.py): the model reads `rows(slots, part)`
  for part 0 (teacher ids), 1 (student ids), 2 (counterfactual ids), where slots (U, H) are
  the rows of the union's ids, p0 before and p1 after the first update."""

  def __init__(self, state, ids, config, axis_name, global_fn, native: bool = False,
               lead: bool = False):
    """native: the table's zero-gradient updates by the native kernel (kernels/adam.py; lead:
    True under pmap); else by the group's optax transform."""
    self.cfg, self.native = config.optim, native
    self.tx = optim.group_transforms(config.optim)[GROUP]
    self.chain = state.opt_state.inner_states[GROUP].inner_state
    self.global_fn = global_fn
    table = get(state.params)
    self.table = table
    self.count, self.mu, self.nu = moments(state.opt_state)
    B, L = ids[0].shape
    self.shape = (B, L, table.shape[1])
    device, gathered = 0, [i.reshape(-1) for i in ids]
    if axis_name and jax.lax.axis_size(axis_name) > 1:
      device = jax.lax.axis_index(axis_name)
      gathered = [jax.lax.all_gather(i, axis_name).reshape(-1) for i in ids]
    self.u = union(gathered, table.shape[0])
    self.local = [inv.reshape(-1, B * L)[device] for inv in self.u.inverse]
    ph = placeholder(table)
    self.params = replace(state.params, ph)
    self.opt_state = with_moments(state.opt_state, ph, ph)
    if native:
      # one kernel call copies out the slots' rows, then takes the whole table and its
      # moments through both updates with zero gradients (they need only the step count)
      lr, wd = optim.adam_groups(self.cfg)[GROUP]
      b1, b2 = self.cfg.b1, self.cfg.b2
      count1 = optax.safe_increment(self.count)
      coef = jnp.concatenate([native_adam.bias_corrections(b1, b2, c)[None]
                              for c in (count1, optax.safe_increment(count1))])
      *self.zero_updated, self.p0, self.m0, self.v0 = native_adam.gather_update(
          table, self.mu, self.nu, self.u.ids, coef, b1=b1, b2=b2, eps=self.cfg.eps, lr=lr,
          wd=wd, lead=lead)
    else:
      self.p0 = gather_slots(table, self.u)
      self.m0, self.v0 = gather_slots(self.mu, self.u), gather_slots(self.nu, self.u)

  def _update(self, p, m, v, g, count):
    """One update of the group's transform on rows p (moments m, v, `count` updates so far)
    for their raw gradient g: (p + update, mu, nu, count + 1)."""
    i, _ = optim.adam_state(self.chain)
    inner = list(self.chain)
    inner[i] = optax.ScaleByAdamState(count=count, mu=m, nu=v)
    updates, new = self.tx.update(g, tuple(inner), p)
    return p + updates, new[i].mu, new[i].nu, new[i].count

  def rows(self, slots, part):
    return jnp.take(slots, self.local[part], axis=0).reshape(self.shape)

  def sums(self, slot_grads):
    return zero_padding_slot(self.u, self.global_fn(slot_grads))

  def first_update(self, grads):
    """θ0 → θ1 on the slots, for the raw (clipped) slot gradients."""
    self.p1, self.m1, self.v1, self.count1 = self._update(self.p0, self.m0, self.v0, grads,
                                                          self.count)

  def finish(self, params, opt_state, grads):
    """params and opt_state of θ2 with the table and its moments: both updates with zero
    gradients over the whole table, the slots' own two updates written over their rows."""
    if self.native:
      p, m, v = self.zero_updated
    else:
      zero = jnp.zeros_like(self.table)
      p, m, v, _ = self._update(self.table, self.mu, self.nu, zero, self.count)
      p, m, v, _ = self._update(p, m, v, zero, self.count1)
    p_s, m_s, v_s, _ = self._update(self.p1, self.m1, self.v1, grads, self.count1)
    p, m, v = (scatter_slots(a, self.u, r) for a, r in ((p, p_s), (m, m_s), (v, v_s)))
    return replace(params, p), with_moments(opt_state, m, v)

  def dense_grads(self, tree, slot_grads):
    """tree with the (V, H) table gradient the dense form would have (for return_grads)."""
    return replace(tree, jnp.zeros_like(self.table).at[self.u.ids].add(slot_grads, mode='drop'))
