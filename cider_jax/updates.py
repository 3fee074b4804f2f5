"""The optimizer updates of a train step behind one interface (docs/model.md §4).

  it = Iteration.begin(state.params, state.opt_state, ids, tx=..., labels=..., ops=..., ...)
  params, x = it.view(it.theta, x, part)   # what the model reads for pass `part`
  it, grad_norm = it.update(grads)         # one Adam update; grads: cotangents of it.theta
  params, opt_state = it.finish()

`theta` is what the step differentiates: {'params': the parameters} and, in the row-wise
form, 'rows': the word-embedding rows of the step's ids. The implementations come from the
model's ops (models/ops.py): `adam_update` (optax's transform, or its in-place kernel form)
and `table_zero_updates` (the row-wise table's update over the whole table); whether the
table is taken row-wise is `row_wise_embeddings` there, or config.optim.embedding_rows.
"""
import dataclasses
from typing import Any, Optional

from cider_jax import embedding_rows, optim


ROW_WISE = {'auto': None, 'on': True, 'off': False, True: True, False: False}


def row_wise(setting, ops) -> bool:
  """config.optim.embedding_rows: 'auto' follows the ops; 'on' / 'off' force it."""
  if setting not in ROW_WISE:
    raise ValueError(f"optim.embedding_rows must be 'auto', 'on' or 'off', got {setting!r}")
  return ops.row_wise_embeddings if ROW_WISE[setting] is None else ROW_WISE[setting]


@dataclasses.dataclass(frozen=True)
class Iteration:
  theta: Any
  opt_state: Any
  tx: Any
  labels: Any
  cfg: Any                      # config.optim
  adam_update: Any              # optim.apply_update or a form with its signature
  lead: bool                    # under pmap (the in-place form takes (1, ...) parameters)
  rows: Optional[embedding_rows.Rows] = None
  scale: Any = 1.0              # the learning-rate schedule's factor at this step

  @classmethod
  def begin(cls, params, opt_state, ids, *, tx, labels, config, ops, axis_name, lead,
            updates: int = 2, scale=1.0):
    """ids: the (B, L) token ids of every pass the model makes in this step; scale: the
    learning-rate schedule's factor at this step (optim.lr_factor), for every update."""
    rows = None
    if row_wise(config.optim.get('embedding_rows', 'auto'), ops) and (
        embedding_rows.present(params)):
      rows, params, opt_state = embedding_rows.Rows.begin(
          params, opt_state, ids, config.optim, axis_name, ops.table_zero_updates, updates,
          lead, scale)
    theta = {'params': params} if rows is None else {'params': params, 'rows': rows.p}
    return cls(theta, opt_state, tx, labels, config.optim, ops.adam_update, lead, rows, scale)

  def view(self, theta, x, part: int):
    """(parameters, model inputs) of pass `part` (the index of its ids in `begin`)."""
    if self.rows is None:
      return theta['params'], x
    return theta['params'], dict(x, text_word_rows=self.rows.word_rows(theta['rows'], part))

  def _zero_padding(self, grads):
    """The padding id 0 receives no gradient (torch padding_idx)."""
    if self.rows is None:
      return {'params': optim.zero_padding_row(grads['params'])}
    return dict(grads, rows=self.rows.zero_padding(grads['rows']))

  def update(self, grads, *, skip=(), after=()):
    """One Adam update for the (global) grads of theta, clipped by their global norm; the
    groups in `skip` keep their parameters and state. after: arrays computed from theta that
    must be read before it changes (an in-place update follows them). → (next, grad norm)."""
    grads, norm = optim.clip_by_global_norm(self._zero_padding(grads), self.cfg.grad_clip)
    params, opt_state = self.adam_update(
        self.tx, self.labels, self.theta['params'], grads['params'], self.opt_state,
        cfg=self.cfg, skip=skip, lead=self.lead, after=(grads.get('rows'), after),
        scale=self.scale)
    rows = self.rows if self.rows is None else self.rows.update(grads['rows'])
    theta = dict(self.theta, params=params)
    if rows is not None:
      theta['rows'] = rows.p
    return dataclasses.replace(self, theta=theta, opt_state=opt_state, rows=rows), norm

  def finish(self):
    """(params, opt_state) after the updates."""
    if self.rows is None:
      return self.theta['params'], self.opt_state
    return self.rows.finish(self.theta['params'], self.opt_state)

  def dense_grads(self, grads):
    """The gradient tree of the parameters for theta's grads (padding row zeroed)."""
    grads = self._zero_padding(grads)
    if self.rows is None:
      return grads['params']
    return self.rows.dense_grads(grads['params'], grads['rows'])
