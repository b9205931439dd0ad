r"""Contrastive representation distillation (CRD): the loss, its memory bank and the algorithm of one step.

CRD (Tian, Krishnan and Isola, ICLR 2020) is a per-example contrastive (NCE) loss. Each example's student embedding
is contrasted with the teacher's memory-bank row of the same example (the positive) and with :math:`K` other rows
(the negatives), and symmetrically the teacher's embedding against the student's bank; the banks are momentum
averages of past embeddings, one row per training example. The pieces:

- :class:`CRDHeads`: the two trained embedding heads (linear, L2-normalised rows).
- :class:`CRDMemory`, :func:`crd_init_memory`: the memory bank, a plain pytree kept in the train state.
- :func:`crd_sample_contrast_indices`, :func:`crd_log_normalizers`, :func:`crd_loss`, :func:`crd_update_memory`:
  the loss and the bank update, as pure functions.
- :func:`crd_init_state`, :func:`crd_step`: the algorithm of one train step on the embeddings (sampling, the
  normaliser kept from the first batch, the loss, the bank update), as :func:`jaxkd.methods.crd` runs it.

Deviations from the authors' code (RepDistiller):

- Negatives are drawn from the other ``num_data - 1`` examples, never the positive, with one key per example folded
  from the step's key and the example's dataset index, so they do not depend on how the batch is split over devices.
- The loss is computed in log space instead of with :math:`10^{-7}` added inside the logarithms.
- The banks are updated from the *global* batch (``all_gather`` over the data-parallel axis), so the replicas' banks
  stay identical; the authors train on one device.
- With ``global_normalizers`` the partition-function estimates :math:`\log Z`, taken on the first batch and then
  kept as in the authors' code, are estimated over the global first batch: each device's :math:`Z_d` is a mean over
  its own scores, and :math:`Z = \frac{1}{D} \sum_d Z_d`. That is the mean over the global batch only when every
  device holds the same number of examples (true of the equal shards of ``pmap`` and ``shard_map``). Without it,
  each device keeps the estimate of its own first batch, and the replicas' ``log_z`` differ.

References:
  Tian, Krishnan and Isola, *Contrastive Representation Distillation*, ICLR 2020.
  https://arxiv.org/abs/1910.10699 (code: https://github.com/HobbitLong/RepDistiller)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd._numerics import as_float, l2_normalize

__all__ = [
  "CRDHeads",
  "CRDMemory",
  "crd_init_memory",
  "crd_sample_contrast_indices",
  "crd_log_normalizers",
  "crd_loss",
  "crd_update_memory",
  "crd_init_state",
  "crd_step",
]


# ---------------------------------------------------------------- memory bank, heads and loss


class CRDMemory(NamedTuple):
  """CRD's memory bank: one L2-normalised embedding per training example, for each side.

  A plain pytree, so it can live in the train state, be checkpointed and be
  updated inside the jitted step with :func:`crd_update_memory`.

  Attributes:
    student: ``[num_data, embed_dim]`` past student embeddings.
    teacher: ``[num_data, embed_dim]`` past teacher embeddings.
  """

  student: jax.Array
  teacher: jax.Array


def crd_init_memory(rng: jax.Array, num_data: int, embed_dim: int = 128) -> CRDMemory:
  """A fresh memory bank, uniform in :math:`[-s, s]` with :math:`s = 1/\\sqrt{d/3}` (rows of norm about 1).

  Args:
    rng: a ``jax.random.key``.
    num_data: number of training examples (the dataset indices run over ``[0, num_data)``).
    embed_dim: the embedding width :math:`d` (128 in the paper).

  Returns:
    A :class:`CRDMemory` of two float32 ``[num_data, embed_dim]`` arrays.

  >>> import jax
  >>> crd_init_memory(jax.random.key(0), 10, 4).student.shape
  (10, 4)
  """
  scale = 1.0 / math.sqrt(embed_dim / 3.0)
  student_rng, teacher_rng = jax.random.split(rng)
  shape = (num_data, embed_dim)
  return CRDMemory(
    student=jax.random.uniform(student_rng, shape, jnp.float32, -scale, scale),
    teacher=jax.random.uniform(teacher_rng, shape, jnp.float32, -scale, scale),
  )


class CRDHeads(nn.Module):
  """CRD's two embedding heads: a linear map of each side's flattened features to ``features``, L2-normalised.

  Both heads are trained (with the student); the teacher's *features* are put
  under ``stop_gradient`` here, so no gradient reaches the teacher network.

  Attributes:
    features: embedding width (128 in the paper).
    dtype: computation dtype; parameters and outputs are float32.

  Returns from ``__call__(student_features, teacher_features)``: ``(student_embed,
  teacher_embed)``, each ``[batch, features]`` with unit rows.
  """

  features: int = 128
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, student_features: jax.Array, teacher_features: jax.Array) -> tuple[jax.Array, jax.Array]:
    teacher_features = jax.lax.stop_gradient(teacher_features)
    student_features = student_features.reshape(student_features.shape[0], -1)
    teacher_features = teacher_features.reshape(teacher_features.shape[0], -1)
    student_embed = nn.Dense(self.features, dtype=self.dtype, name="student_embed")(student_features)
    teacher_embed = nn.Dense(self.features, dtype=self.dtype, name="teacher_embed")(teacher_features)
    return l2_normalize(as_float(student_embed)), l2_normalize(as_float(teacher_embed))


def crd_sample_contrast_indices(
  rng: jax.Array, indices: jax.typing.ArrayLike, *, num_negatives: int = 16384, num_data: int
) -> jax.Array:
  """Contrast indices for :func:`crd_loss`: each example's own index, then ``num_negatives`` others.

  Negatives are drawn uniformly with replacement from the other
  ``num_data - 1`` examples (the paper draws from all ``num_data``; excluding
  the positive removes false negatives at no cost).

  Args:
    rng: a ``jax.random.key``.
    indices: integer dataset indices ``[batch]`` of the batch's examples.
    num_negatives: :math:`K` (16384 in the paper).
    num_data: number of training examples.

  Returns:
    int32 ``[batch, 1 + num_negatives]``, column 0 holding ``indices``.

  >>> import jax, jax.numpy as jnp
  >>> crd_sample_contrast_indices(jax.random.key(0), jnp.array([3, 7]), num_negatives=5, num_data=10).shape
  (2, 6)
  """
  indices = jnp.asarray(indices)
  if not jnp.issubdtype(indices.dtype, jnp.integer) or indices.ndim != 1:
    raise ValueError(f"indices must be integer dataset indices of shape [batch], got {indices.dtype} {indices.shape}.")
  if num_data < 2 or num_negatives < 1:
    raise ValueError(f"need num_data >= 2 and num_negatives >= 1, got {num_data} and {num_negatives}.")
  indices = indices.astype(jnp.int32)
  negatives = jax.random.randint(rng, (indices.shape[0], num_negatives), 0, num_data - 1, jnp.int32)
  negatives = negatives + (negatives >= indices[:, None])  # skip the positive
  return jnp.concatenate([indices[:, None], negatives], axis=1)


def _crd_scores(
  student_embed: jax.typing.ArrayLike,
  teacher_embed: jax.typing.ArrayLike,
  memory: CRDMemory,
  contrast_indices: jax.typing.ArrayLike,
  temperature: Any,
) -> tuple[jax.Array, jax.Array]:
  student_embed = as_float(student_embed)
  teacher_embed = as_float(teacher_embed)
  contrast_indices = jnp.asarray(contrast_indices)
  if student_embed.ndim != 2 or student_embed.shape != teacher_embed.shape:
    raise ValueError(
      f"student_embed and teacher_embed must both be [batch, embed_dim], got {tuple(student_embed.shape)} and "
      f"{tuple(teacher_embed.shape)}."
    )
  memory_shape = tuple(np.shape(memory.student))
  if memory_shape != tuple(np.shape(memory.teacher)) or memory_shape[1:] != student_embed.shape[1:]:
    raise ValueError(
      f"memory banks must be [num_data, embed_dim] with embed_dim {student_embed.shape[1]}, got student "
      f"{memory_shape} and teacher {tuple(np.shape(memory.teacher))}."
    )
  if (
    not jnp.issubdtype(contrast_indices.dtype, jnp.integer)
    or contrast_indices.ndim != 2
    or contrast_indices.shape[0] != student_embed.shape[0]
    or contrast_indices.shape[1] < 2
  ):
    raise ValueError(
      f"contrast_indices must be integer [batch, 1 + num_negatives] = ({student_embed.shape[0]}, >= 2), got "
      f"{contrast_indices.dtype} {tuple(contrast_indices.shape)}."
    )
  if isinstance(temperature, numbers.Number) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}.")
  student_memory = jax.lax.stop_gradient(as_float(memory.student))[contrast_indices]  # [batch, 1 + K, embed_dim]
  teacher_memory = jax.lax.stop_gradient(as_float(memory.teacher))[contrast_indices]
  # The student's embedding is contrasted with the teacher's memory, and the teacher's with the student's.
  student_scores = jnp.einsum("bkd,bd->bk", teacher_memory, student_embed) / temperature
  teacher_scores = jnp.einsum("bkd,bd->bk", student_memory, teacher_embed) / temperature
  return student_scores, teacher_scores


def _log_normalizer(scores: jax.Array, num_data: int) -> jax.Array:
  """log Z with Z = num_data · mean(exp(scores)): the authors' Monte-Carlo estimate of the partition function."""
  return jax.lax.stop_gradient(math.log(num_data) + jax.nn.logsumexp(scores) - math.log(scores.size))


def crd_log_normalizers(
  student_embed: jax.typing.ArrayLike,
  teacher_embed: jax.typing.ArrayLike,
  memory: CRDMemory,
  contrast_indices: jax.typing.ArrayLike,
  *,
  temperature: jax.typing.ArrayLike = 0.07,
) -> tuple[jax.Array, jax.Array]:
  r"""The batch's estimates of :math:`\log Z` for the two NCE terms of :func:`crd_loss`.

  :math:`Z = N \cdot \mathrm{mean}\, \exp(s / \tau)` over the batch's scores,
  under ``stop_gradient``. The authors compute it once, on the first batch,
  and keep it fixed: call this on the first batch, store the pair in the train
  state and pass it as ``log_normalizers``.

  Args:
    student_embed: ``[batch, embed_dim]``.
    teacher_embed: ``[batch, embed_dim]``.
    memory: the :class:`CRDMemory`.
    contrast_indices: ``[batch, 1 + num_negatives]``.
    temperature: :math:`\tau > 0`.

  Returns:
    ``(log_z_student, log_z_teacher)``, float32 scalars.
  """
  student_scores, teacher_scores = _crd_scores(student_embed, teacher_embed, memory, contrast_indices, temperature)
  num_data = memory.student.shape[0]
  return _log_normalizer(student_scores, num_data), _log_normalizer(teacher_scores, num_data)


def crd_loss(
  student_embed: jax.typing.ArrayLike,
  teacher_embed: jax.typing.ArrayLike,
  memory: CRDMemory,
  contrast_indices: jax.typing.ArrayLike,
  *,
  temperature: jax.typing.ArrayLike = 0.07,
  log_normalizers: tuple[jax.typing.ArrayLike, jax.typing.ArrayLike] | None = None,
) -> jax.Array:
  r"""CRD: NCE contrastive loss of each embedding against the other side's memory bank, per example.

  For the student's embedding :math:`s_i` against the teacher's memory rows
  :math:`m_k` at ``contrast_indices[i]`` (:math:`k = 0` the positive, the
  example's own row; :math:`K` negatives), with
  :math:`P_k = \exp(m_k^\top s_i / \tau) / Z` and the noise term
  :math:`K P_n = K / N`:

  .. math::
    \ell^s_i = -\log \frac{P_0}{P_0 + K / N} - \sum_{k=1}^{K} \log \frac{K / N}{P_k + K / N}

  and symmetrically :math:`\ell^t_i` for the teacher's embedding against the
  student's memory; the loss is :math:`\ell^s_i + \ell^t_i`. It is computed in
  log space (the authors add :math:`10^{-7}` inside the logarithms instead).
  With ``log_normalizers=None``, :math:`Z` is estimated on each batch (see
  :func:`crd_log_normalizers`, which gives the authors' fixed-from-the-first-
  batch variant). Memory banks get no gradient; both embeddings do (both heads
  of :class:`CRDHeads` are trained). Paper's settings: ``embed_dim=128``,
  :math:`K = 16384`, :math:`\tau = 0.07`, momentum 0.5, weight 0.8 next to the
  cross-entropy at weight 1.

  Args:
    student_embed: ``[batch, embed_dim]`` unit rows, from :class:`CRDHeads`.
    teacher_embed: ``[batch, embed_dim]`` unit rows.
    memory: the :class:`CRDMemory`, ``[num_data, embed_dim]`` each.
    contrast_indices: integer ``[batch, 1 + K]``, column 0 the examples' own
      dataset indices (:func:`crd_sample_contrast_indices`).
    temperature: :math:`\tau > 0`.
    log_normalizers: optional fixed ``(log_z_student, log_z_teacher)``.

  Returns:
    Per-example loss of shape ``[batch]``, float32.

  >>> import jax, jax.numpy as jnp
  >>> memory = crd_init_memory(jax.random.key(0), 8, 4)
  >>> embed = jnp.eye(4)[:2]
  >>> crd_loss(embed, embed, memory, jnp.array([[0, 1, 2], [1, 0, 3]])).shape
  (2,)

  References:
    Tian, Krishnan and Isola, *Contrastive Representation Distillation*, ICLR 2020.
    https://arxiv.org/abs/1910.10699
  """
  student_scores, teacher_scores = _crd_scores(student_embed, teacher_embed, memory, contrast_indices, temperature)
  num_data = memory.student.shape[0]
  num_negatives = student_scores.shape[1] - 1
  log_noise = math.log(num_negatives / num_data)  # log(K P_n)
  if log_normalizers is None:
    log_normalizers = (_log_normalizer(student_scores, num_data), _log_normalizer(teacher_scores, num_data))

  def nce(scores: jax.Array, log_z: jax.typing.ArrayLike) -> jax.Array:
    log_probs = scores - jax.lax.stop_gradient(jnp.asarray(log_z, scores.dtype))  # log P_k
    positive = log_probs[:, 0] - jnp.logaddexp(log_probs[:, 0], log_noise)
    negatives = jnp.sum(log_noise - jnp.logaddexp(log_probs[:, 1:], log_noise), axis=-1)
    return -(positive + negatives)

  return nce(student_scores, log_normalizers[0]) + nce(teacher_scores, log_normalizers[1])


def crd_update_memory(
  memory: CRDMemory,
  indices: jax.typing.ArrayLike,
  student_embed: jax.typing.ArrayLike,
  teacher_embed: jax.typing.ArrayLike,
  *,
  momentum: float = 0.5,
  axis_name: Any = None,
) -> CRDMemory:
  r"""Momentum update of the rows of the batch's examples, renormalised to unit length.

  .. math::
    m_{y_i} \leftarrow \frac{\mu\, m_{y_i} + (1 - \mu)\, e_i}{\|\mu\, m_{y_i} + (1 - \mu)\, e_i\|_2}

  for each side's bank and embedding (under ``stop_gradient``). Pure: returns
  a new :class:`CRDMemory`; under ``jit`` with the state donated the update is
  in place. With ``axis_name`` the indices and embeddings are gathered over
  that axis first, so every device applies the same global-batch update and
  the replicated banks stay identical. Indices should be distinct within a
  (global) batch; for repeated indices one of the updates wins.

  Args:
    memory: the :class:`CRDMemory`.
    indices: integer dataset indices ``[batch]``.
    student_embed: ``[batch, embed_dim]``.
    teacher_embed: ``[batch, embed_dim]``.
    momentum: :math:`\mu \in [0, 1)` (0.5 in the paper).
    axis_name: optional named axis to gather the global batch over.

  Returns:
    The updated :class:`CRDMemory`.

  >>> import jax, jax.numpy as jnp
  >>> memory = CRDMemory(jnp.zeros((3, 2)), jnp.zeros((3, 2)))
  >>> crd_update_memory(memory, jnp.array([1]), jnp.array([[3.0, 4.0]]), jnp.array([[0.0, 2.0]])).student
  Array([[0. , 0. ],
         [0.6, 0.8],
         [0. , 0. ]], dtype=float32)
  """
  if isinstance(momentum, numbers.Number) and not 0.0 <= momentum < 1.0:
    raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
  indices = jnp.asarray(indices)
  student_embed = jax.lax.stop_gradient(as_float(student_embed))
  teacher_embed = jax.lax.stop_gradient(as_float(teacher_embed))
  if not jnp.issubdtype(indices.dtype, jnp.integer) or indices.ndim != 1:
    raise ValueError(f"indices must be integer dataset indices of shape [batch], got {indices.dtype} {indices.shape}.")
  for name, embed, bank in [("student", student_embed, memory.student), ("teacher", teacher_embed, memory.teacher)]:
    if embed.shape != (indices.shape[0], np.shape(bank)[1]):
      raise ValueError(
        f"{name}_embed must be [batch, embed_dim] = ({indices.shape[0]}, {np.shape(bank)[1]}), got "
        f"{tuple(embed.shape)}."
      )
  if axis_name is not None:
    indices, student_embed, teacher_embed = jax.lax.all_gather(
      (indices, student_embed, teacher_embed), axis_name, tiled=True
    )

  def update(bank: jax.Array, embed: jax.Array) -> jax.Array:
    bank = jnp.asarray(bank)
    rows = momentum * bank[indices].astype(embed.dtype) + (1.0 - momentum) * embed
    return bank.at[indices].set(l2_normalize(rows).astype(bank.dtype))

  return CRDMemory(student=update(memory.student, student_embed), teacher=update(memory.teacher, teacher_embed))


# ---------------------------------------------------------------- the algorithm of one step


def crd_init_state(rng: jax.Array, num_data: int, *, embed_dim: int = 128) -> dict[str, Any]:
  """CRD's state for :func:`crd_step`: a fresh memory bank (:func:`crd_init_memory`) and no :math:`\\log Z` yet.

  Args:
    rng: a ``jax.random.key``.
    num_data: number of training examples (the dataset indices run over ``[0, num_data)``).
    embed_dim: the embedding width (128 in the paper).

  Returns:
    ``{'memory': {'student': ..., 'teacher': ...}, 'log_z': ..., 'log_z_ready': ...}``: the two float32
    ``[num_data, embed_dim]`` banks, float32 ``[2]`` zeros for ``(log_z_student, log_z_teacher)`` and an int32
    scalar 0 that :func:`crd_step` sets to 1 once ``log_z`` holds the first batch's estimate.

  >>> import jax
  >>> state = crd_init_state(jax.random.key(0), 10, embed_dim=4)
  >>> state["memory"]["teacher"].shape, state["log_z"].shape, int(state["log_z_ready"])
  ((10, 4), (2,), 0)
  """
  memory = crd_init_memory(rng, num_data, embed_dim)
  return {
    "memory": {"student": memory.student, "teacher": memory.teacher},
    "log_z": jnp.zeros((2,), jnp.float32),
    "log_z_ready": jnp.zeros((), jnp.int32),
  }


def _sample_per_example(rng: jax.Array, index: jax.Array, *, num_negatives: int, num_data: int) -> jax.Array:
  """Contrast indices ``[batch, 1 + num_negatives]``, each row from its own key ``fold_in(rng, index)``."""

  def sample(i: jax.Array) -> jax.Array:
    key = jax.random.fold_in(rng, i)
    return crd_sample_contrast_indices(key, i[None], num_negatives=num_negatives, num_data=num_data)[0]

  return jax.vmap(sample)(index)


def _checked_index(index: jax.typing.ArrayLike | None, mask: jax.typing.ArrayLike, batch: int, name: str) -> jax.Array:
  if index is None:
    raise ValueError(
      f"term {name!r} (CRD) needs each example's dataset index in batch['index']: "
      "use jaxkd.data.BatchIterator(..., include_index=True)."
    )
  index = jnp.asarray(index)
  if index.shape != (batch,) or not jnp.issubdtype(index.dtype, jnp.integer) or np.shape(mask) != (batch,):
    raise ValueError(
      f"index and mask must be [batch] = ({batch},), index integer; got index {index.dtype} {tuple(index.shape)} "
      f"and mask {tuple(np.shape(mask))}."
    )
  return index


def _kept_log_z(
  estimate: jax.Array, state: Mapping[str, Any], *, axis_name: Hashable, global_normalizers: bool
) -> jax.Array:
  """The ``[2]`` log Z in use: the stored one once ready, else this batch's estimate (global if asked)."""
  if global_normalizers:
    # Z is a mean over the scores; with equal per-device batches the global mean is the mean of the devices'.
    gathered = jax.lax.all_gather(estimate, axis_name)  # [devices, 2]
    estimate = jax.nn.logsumexp(gathered, axis=0) - math.log(gathered.shape[0])
  ready = state["log_z_ready"] > 0
  return jnp.where(ready, state["log_z"], estimate)


def crd_step(
  student_embed: jax.typing.ArrayLike,
  teacher_embed: jax.typing.ArrayLike,
  state: Mapping[str, Any],
  *,
  index: jax.typing.ArrayLike | None,
  mask: jax.typing.ArrayLike,
  rng: jax.Array,
  axis_name: Hashable,
  num_negatives: int = 16384,
  temperature: jax.typing.ArrayLike = 0.07,
  momentum: float = 0.5,
  global_normalizers: bool = True,
  name: str = "crd",
) -> tuple[jax.Array, dict[str, Any]]:
  r"""One train step of CRD on one device's embeddings: the per-example loss and the next state.

  1. Contrast indices: the row of example :math:`i`, with dataset index :math:`y_i`, is
     :func:`crd_sample_contrast_indices` of :math:`y_i` under the key ``fold_in(rng, y_i)``.
  2. :math:`\log Z`: while ``state['log_z_ready']`` is 0, the batch's estimate (:func:`crd_log_normalizers`); with
     ``global_normalizers`` the devices' estimates are combined over ``axis_name``,

     .. math::
       \log Z = \log \frac{1}{D} \sum_{d=1}^{D} Z_d ,

     the global batch's estimate when the :math:`D` devices hold equal batches. Afterwards the stored value.
  3. The loss: :func:`crd_loss` with those fixed normalisers.
  4. The bank: :func:`crd_update_memory` over the global batch (gathered over ``axis_name``); rows whose ``mask``
     is False leave the bank unchanged.

  Args:
    student_embed: ``[batch, embed_dim]`` unit rows, from :class:`CRDHeads`.
    teacher_embed: ``[batch, embed_dim]`` unit rows.
    state: from :func:`crd_init_state`, or the previous step's.
    index: integer ``[batch]`` dataset indices of the examples, in ``[0, num_data)``; None raises.
    mask: boolean ``[batch]``, False for padding.
    rng: this step's key, the same on every device (so that negatives do not depend on the device layout) and
      new each step.
    axis_name: the data-parallel axis; it must be bound (size 1 on one device).
    num_negatives: :math:`K` (16384 in the paper).
    temperature: :math:`\tau > 0` (0.07 in the paper).
    momentum: the banks' :math:`\mu \in [0, 1)` (0.5 in the paper).
    global_normalizers: estimate :math:`\log Z` over the global first batch, not each device's own.
    name: the loss term's name, for the error message.

  Returns:
    ``(loss, new_state)``: the float32 per-example loss ``[batch]`` (padding rows included: leave them out of the
    mean) and the state with the updated banks, the :math:`\log Z` in use and ``log_z_ready`` 1.

  Raises:
    ValueError: when ``index`` is None, or ``index`` or ``mask`` is not ``[batch]``.

  References:
    Tian, Krishnan and Isola, *Contrastive Representation Distillation*, ICLR 2020.
    https://arxiv.org/abs/1910.10699
  """
  index = _checked_index(index, mask, np.shape(student_embed)[0], name)
  memory = CRDMemory(**state["memory"])
  num_data = memory.student.shape[0]
  contrast = _sample_per_example(rng, index, num_negatives=num_negatives, num_data=num_data)  # [batch, 1 + K]
  estimate = jnp.stack(
    crd_log_normalizers(student_embed, teacher_embed, memory, contrast, temperature=temperature)
  )  # [2]
  log_z = _kept_log_z(estimate, state, axis_name=axis_name, global_normalizers=global_normalizers)
  loss = crd_loss(
    student_embed, teacher_embed, memory, contrast, temperature=temperature, log_normalizers=(log_z[0], log_z[1])
  )
  # Padding rows point past the bank: their (dropped) updates leave it untouched.
  update_index = jnp.where(mask, index, num_data)
  memory = crd_update_memory(memory, update_index, student_embed, teacher_embed, momentum=momentum, axis_name=axis_name)
  new_state = {
    "memory": {"student": memory.student, "teacher": memory.teacher},
    "log_z": log_z,
    "log_z_ready": jnp.ones((), jnp.int32),
  }
  return loss, new_state
