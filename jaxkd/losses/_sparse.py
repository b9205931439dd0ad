"""Distillation from a sparse top-k teacher: the losses of language-model KD from a cache of the teacher's top k.

A dense cache of a language model's logits costs ``4 * vocab_size`` bytes per token (32 KiB at a vocabulary of
8192), more than the text it describes by four orders of magnitude. An offline cache keeps, per token, only the
teacher's top ``k`` logits, their vocabulary indices and the log of the teacher's softmax normaliser
(:func:`teacher_topk` computes them; :func:`topk_bytes_per_token` counts their bytes), and the student is
distilled towards that sparse teacher with :func:`sparse_kd_loss`, Hinton's :math:`T^2\\,\\mathrm{KL}` restricted
to the teacher's top k in one of two ways:

* ``tail="renormalize"`` (the default): both distributions renormalised over the teacher's k classes;
* ``tail="bucket"``: the k classes plus one bucket for all the others, the exact KL of the two coarsened
  (k + 1)-class distributions (as in TRL's and DistillKit's sparse distillation).

Why ``"renormalize"`` is the default: in this repository's language-model calibration (``CALIBRATION.md``: a
weak, uncertain teacher whose top 8 held 54% of its probability and top 32 67%), renormalising was *better* than
the tail bucket by about 0.014 test bits/byte at both k = 8 and k = 32, and top-32 renormalised matched dense KD
within noise; it also needs no normaliser in the cache. The bucket's extra term asks the student to spread the
teacher's missing mass over the tail with no guidance where, which with an uncertain teacher is a large, blunt
target. ``"bucket"`` is the exact divergence of what the cache knows and keeps the teacher's confidence (a
renormalised teacher looks equally sure whether its top k hold 99% or 50%); prefer it for confident teachers
whose top k hold nearly all the mass, where the two differ little, or when the tail's calibration matters.
Prefer it also for short schedules: with the same teacher and students of only 100 steps
(``experiments/lm_distill.py``, README) the renormalised top-8/32/128 students ended *worse* than scratch
(2.52/2.51/2.44 bits/byte against 2.34) and the bucket ones better (2.30/2.28/2.26): a young student still has
to learn how much mass the tail holds, which renormalising never tells it.

The conventions are those of :mod:`jaxkd.losses`: pure per-token losses (the caller reduces), keyword-only
hyperparameters, float32 arithmetic whatever the input dtype (a cache stores 16-bit logits and ``uint16``
indices), the teacher side under ``stop_gradient``, user errors raised from static shapes at trace time, and a
``position_mask`` of shape ``student_logits.shape[:-1]`` whose False positions contribute exactly 0 and get a zero
gradient whatever they hold. Concrete values are checked at trace time (a temperature that is not finite and > 0,
indices outside ``[0, vocab_size)`` at kept positions raise ValueError); traced ones make the result NaN so that a
train step's guard skips the step: a traced temperature that is not finite and > 0 (every kept position), a traced
index out of range (that position), and a teacher without a distribution at a kept position (that position).

The per-token log-probability of a label, for perplexity, is ``-jaxkd.losses.hard_cross_entropy(logits, labels)``.

References:
  Hinton, Vinyals and Dean, *Distilling the Knowledge in a Neural Network*, 2015.
  https://arxiv.org/abs/1503.02531
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd._checks import check_position_mask, check_temperature
from jaxkd._numerics import as_float, as_temperature, kl_terms, nan_where, undefined_distribution

__all__ = [
  "TAIL_MODES",
  "teacher_topk",
  "sparse_kd_loss",
  "topk_bytes_per_token",
]

TAIL_MODES = ("renormalize", "bucket")


# ---------------------------------------------------------------- checks of this module


def _check_k(k: Any, vocab_size: int, *, what: str) -> int:
  """Raises unless ``k`` is an integer in [1, vocab_size]; ``what`` names the array of the vocabulary axis."""
  if isinstance(k, bool) or not isinstance(k, numbers.Integral):
    raise TypeError(f"k must be an integer, got {type(k).__name__}: {k!r}.")
  if not 1 <= k <= vocab_size:
    raise ValueError(f"k must be in [1, vocab_size={vocab_size}] ({what}), got k={k}.")
  return int(k)


def _check_sparse_teacher(
  student_logits: jax.Array,
  topk_logits: jax.Array,
  topk_indices: jax.Array,
  log_normalizer: jax.Array | None,
) -> None:
  """Raises unless the sparse teacher's arrays fit the student's ``[..., vocab_size]`` logits."""
  if student_logits.ndim < 1:
    raise ValueError(f"student_logits need a vocabulary axis, got a scalar of shape {tuple(student_logits.shape)}.")
  if topk_logits.shape != topk_indices.shape:
    raise ValueError(
      f"topk_logits and topk_indices must have the same shape [..., k], got topk_logits {tuple(topk_logits.shape)} "
      f"and topk_indices {tuple(topk_indices.shape)}."
    )
  if not jnp.issubdtype(topk_indices.dtype, jnp.integer):
    raise TypeError(f"topk_indices must be integer vocabulary indices, got dtype {topk_indices.dtype}.")
  if topk_logits.ndim < 1 or topk_logits.shape[:-1] != student_logits.shape[:-1]:
    raise ValueError(
      f"topk_logits must have shape student_logits.shape[:-1] + (k,) = {tuple(student_logits.shape[:-1])} + (k,), "
      f"got {tuple(topk_logits.shape)} (student_logits {tuple(student_logits.shape)})."
    )
  vocab_size, k = student_logits.shape[-1], topk_logits.shape[-1]
  if not 1 <= k <= vocab_size:
    raise ValueError(
      f"the teacher's k = topk_logits.shape[-1] must be in [1, vocab_size={vocab_size}], got topk_logits "
      f"{tuple(topk_logits.shape)} and student_logits {tuple(student_logits.shape)}."
    )
  if log_normalizer is not None and log_normalizer.shape != tuple(student_logits.shape[:-1]):
    raise ValueError(
      f"log_normalizer must have shape student_logits.shape[:-1] = {tuple(student_logits.shape[:-1])}, got "
      f"{tuple(log_normalizer.shape)} (student_logits {tuple(student_logits.shape)})."
    )


def _check_index_range(topk_indices: Any, vocab_size: int, *, position_mask: Any = None) -> None:
  """Raises ValueError for concrete indices outside [0, vocab_size) at the positions ``position_mask`` keeps.

  Pass the arguments as given: under ``jit`` even a NumPy constant becomes a tracer after ``jnp.asarray``. Traced
  indices (or a traced mask) pass; :func:`sparse_kd_loss` makes their out-of-range positions NaN instead.

  >>> _check_index_range(np.array([[0, 4]]), 5)
  >>> _check_index_range(np.array([[0, 5]]), 5)
  Traceback (most recent call last):
  ...
  ValueError: topk_indices must be in [0, vocab_size=5), got values in [0, 5].
  """
  if isinstance(topk_indices, jax.core.Tracer) or isinstance(position_mask, jax.core.Tracer):
    return
  values = np.asarray(topk_indices)
  if position_mask is not None:
    values = values[np.asarray(position_mask)]  # [kept, k]
  if values.size and (values.min() < 0 or values.max() >= vocab_size):
    raise ValueError(
      f"topk_indices must be in [0, vocab_size={vocab_size}), got values in [{values.min()}, {values.max()}]."
    )


def _check_tail(tail: Any) -> None:
  if not isinstance(tail, str) or tail not in TAIL_MODES:
    raise ValueError(f"tail must be one of {TAIL_MODES}, got {tail!r}.")


# ---------------------------------------------------------------- numerics


def _log1mexp(x: jax.Array) -> jax.Array:
  r""":math:`\log(1 - e^x)` for :math:`x < 0`, accurate at both ends (Mächler's ``log1mexp``).

  ``-expm1`` near 0, where :math:`1 - e^x` cancels; ``log1p(-exp)`` far below, where :math:`e^x` underflows.
  """
  near_zero = x > -np.log(2.0)
  # Each branch sees only arguments it is finite at (double-where), so neither leaks a NaN into a gradient.
  return jnp.where(
    near_zero, jnp.log(-jnp.expm1(jnp.where(near_zero, x, -1.0))), jnp.log1p(-jnp.exp(jnp.where(near_zero, -1.0, x)))
  )


def _scatter_mask(indices: jax.Array, vocab_size: int) -> jax.Array:
  """Boolean ``[..., vocab_size]``, True at the ``[..., k]`` indices (a scatter, not a ``[..., k, V]`` one-hot)."""
  empty = jnp.zeros((*indices.shape[:-1], vocab_size), jnp.bool_)
  return jnp.put_along_axis(empty, indices, True, axis=-1, inplace=False)


# ---------------------------------------------------------------- public API


def teacher_topk(
  teacher_logits: jax.typing.ArrayLike,
  *,
  k: int,
  temperature: jax.typing.ArrayLike = 1.0,
) -> dict[str, jax.Array]:
  r"""The sparse teacher of a cache: its top ``k`` logits, their indices and its log-normaliser at temperature T.

  .. math::
    \mathcal{I} = \operatorname{top-}k(t), \quad
    \log Z = \log \sum_{j=1}^{V} \exp\left(\frac{t_j}{T}\right), \quad
    p_i = \exp\left(\frac{t_i}{T} - \log Z\right),\ i \in \mathcal{I}

  The logits are stored as they are (not divided by :math:`T`), the normaliser over the *full* vocabulary at
  :math:`T`: :func:`sparse_kd_loss` must be called with the same temperature for its ``tail="bucket"`` mode to
  see the teacher's true probabilities (``tail="renormalize"`` needs no normaliser and works at any temperature).
  Ties are broken as :func:`jax.lax.top_k` breaks them (lower index first), so the k indices are distinct.

  Args:
    teacher_logits: ``[..., vocab_size]``, e.g. ``[batch, seq, vocab]``.
    k: how many classes to keep, an integer in ``[1, vocab_size]``.
    temperature: :math:`T > 0` of the normaliser; a concrete value that is not finite and > 0 raises ValueError,
      a traced one makes ``log_normalizer`` NaN.

  Returns:
    A dict with ``topk_logits``, float32 ``[..., k]`` in decreasing order; ``topk_indices``, int32 ``[..., k]``;
    ``log_normalizer``, float32 ``[...]``. Cast the first two to 16 bits (``float16``/``bfloat16``,
    ``uint16`` for vocabularies up to 65,536) to store them: :func:`sparse_kd_loss` accepts them as they are.

  >>> import jax.numpy as jnp
  >>> cache = teacher_topk(jnp.array([[0.0, 3.0, 1.0]]), k=2)
  >>> cache["topk_logits"], cache["topk_indices"]
  (Array([[3., 1.]], dtype=float32), Array([[1, 2]], dtype=int32))
  >>> round(float(cache["log_normalizer"][0]), 4)  # log(1 + e^3 + e)
  3.1698

  References:
    Hinton et al., *Distilling the Knowledge in a Neural Network*, 2015.
  """
  teacher_logits = as_float(teacher_logits)
  if teacher_logits.ndim < 1:
    raise ValueError(f"teacher_logits need a vocabulary axis, got a scalar of shape {tuple(teacher_logits.shape)}.")
  k = _check_k(k, teacher_logits.shape[-1], what=f"teacher_logits {tuple(teacher_logits.shape)}")
  check_temperature(temperature)
  return _teacher_topk(teacher_logits, as_temperature(temperature, teacher_logits.dtype), k=k)


@functools.partial(jax.jit, static_argnames=("k",))
def _teacher_topk(teacher_logits: jax.Array, temperature: jax.Array, *, k: int) -> dict[str, jax.Array]:
  topk_logits, topk_indices = jax.lax.top_k(teacher_logits, k)
  return {
    "topk_logits": topk_logits,
    "topk_indices": topk_indices.astype(jnp.int32),
    "log_normalizer": jax.nn.logsumexp(teacher_logits / temperature, axis=-1),
  }


def sparse_kd_loss(
  student_logits: jax.typing.ArrayLike,
  topk_logits: jax.typing.ArrayLike,
  topk_indices: jax.typing.ArrayLike,
  log_normalizer: jax.typing.ArrayLike | None = None,
  *,
  temperature: jax.typing.ArrayLike = 1.0,
  tail: str = "renormalize",
  position_mask: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Hinton's soft-target loss against a sparse top-k teacher, per token.

  With the teacher's top-k logits :math:`t_i` at the vocabulary indices :math:`i \in \mathcal{I}`
  (:math:`|\mathcal{I}| = k`), its log-normaliser :math:`\log Z = \log \sum_{j=1}^{V} e^{t_j / T}` and the
  student's logits :math:`s`, ``tail="renormalize"`` compares the two distributions renormalised over
  :math:`\mathcal{I}`:

  .. math::
    \tilde p_i = \frac{e^{t_i / T}}{\sum_{j \in \mathcal{I}} e^{t_j / T}}, \quad
    \tilde q_i = \frac{e^{s_i / T}}{\sum_{j \in \mathcal{I}} e^{s_j / T}}, \quad
    \ell = T^2 \sum_{i \in \mathcal{I}} \tilde p_i \left(\log \tilde p_i - \log \tilde q_i\right)

  and ``tail="bucket"`` compares the (k + 1)-class distributions of the k classes and one bucket for the rest:

  .. math::
    p_i = e^{t_i / T - \log Z}, \quad p_\mathrm{tail} = \max\Bigl(0,\ 1 - \sum_{i \in \mathcal{I}} p_i\Bigr), \quad
    q = \mathrm{softmax}(s / T), \quad q_\mathrm{tail} = \sum_{j \notin \mathcal{I}} q_j

  .. math::
    \ell = T^2 \Bigl[\sum_{i \in \mathcal{I}} p_i \left(\log p_i - \log q_i\right)
      + p_\mathrm{tail} \left(\log p_\mathrm{tail} - \log q_\mathrm{tail}\right)\Bigr]

  with :math:`0 \log 0 = 0`. With :math:`k = V` (every class, in any order) both equal
  :func:`jaxkd.losses.kd_loss` (the tail is then empty on both sides and dropped). For :math:`k < V` the bucket
  loss is the exact KL of the coarsened distributions, so it never exceeds the dense :math:`T^2\,\mathrm{KL}`
  (data processing); it also teaches the student how much mass the teacher leaves outside its top k.
  :math:`1 - \sum p_i` is computed from :math:`\operatorname{logsumexp}_i \log p_i` with ``expm1``/``log1p``, so
  it stays accurate when the top k hold almost all the mass, and :math:`q_\mathrm{tail}` as a ``logsumexp`` over
  the classes not in :math:`\mathcal{I}` (a scattered ``[..., V]`` mask).

  Why ``"renormalize"`` is the default, and when to prefer ``"bucket"``: see the module docstring.

  The k indices of a position must be *distinct* (as :func:`teacher_topk` makes them); duplicates are not checked
  (that costs a sort) and would count their class twice. A 16-bit cache rounds the logits (bfloat16 by up to
  :math:`2^{-8}` relative), so :math:`\sum p_i` may exceed 1 slightly; the tail bucket is then clipped to 0.

  Args:
    student_logits: ``[..., vocab_size]``, e.g. ``[batch, seq, vocab]``; float32 or 16-bit.
    topk_logits: the teacher's top-k logits (not divided by :math:`T`), ``[..., k]`` with
      ``1 <= k <= vocab_size``; float16/bfloat16 are computed in float32. −inf marks a class with probability 0.
    topk_indices: their vocabulary indices, same shape, any integer dtype (``uint16`` or ``int32``; cast to int32),
      distinct per position. Concrete ones outside ``[0, vocab_size)`` at kept positions raise ValueError, traced
      ones make their position NaN (never clamped to a valid class).
    log_normalizer: the teacher's :math:`\log Z` at the same temperature, ``[...]`` (``student_logits.shape[:-1]``);
      required by ``tail="bucket"``, unused (may be None) by ``tail="renormalize"``.
    temperature: :math:`T > 0`; a concrete value that is not finite and > 0 raises ValueError, a traced one makes
      the loss NaN. The :math:`T^2` factor keeps gradient magnitudes comparable across temperatures.
    tail: ``"renormalize"`` (default) or ``"bucket"``, see above.
    position_mask: optional boolean mask of shape ``student_logits.shape[:-1]`` (the ``[batch, seq]`` token mask);
      False positions contribute exactly 0 and no gradient, whatever their inputs hold (NaN, inf, any index).

  Returns:
    Per-token loss of shape ``student_logits.shape[:-1]``, float32. NaN at a kept position whose teacher has no
    distribution: a NaN or +inf top-k logit, a non-finite ``log_normalizer`` (bucket), all top-k logits −inf
    (renormalize); and at a kept position with a traced out-of-range index.

  >>> import jax.numpy as jnp
  >>> teacher = jnp.array([[2.0, 0.0, 1.0, -1.0]]); student = jnp.array([[1.0, 0.0, 1.0, 0.0]])
  >>> cache = teacher_topk(teacher, k=2)
  >>> sparse_kd_loss(student, cache["topk_logits"], cache["topk_indices"]).round(4)
  Array([0.1109], dtype=float32)
  >>> sparse_kd_loss(student, **cache, tail="bucket").round(4)
  Array([0.1648], dtype=float32)
  >>> full = teacher_topk(teacher, k=4)
  >>> sparse_kd_loss(student, **full, tail="bucket").round(3)  # k = V: kd_loss, 0.1781
  Array([0.178], dtype=float32)

  References:
    Hinton et al., *Distilling the Knowledge in a Neural Network*, 2015.
  """
  checked = _checked_inputs(student_logits, topk_logits, topk_indices, log_normalizer, temperature, tail, position_mask)
  return _sparse_kd_loss(*checked, tail=tail)


def _checked_inputs(
  student_logits: jax.typing.ArrayLike,
  topk_logits: jax.typing.ArrayLike,
  topk_indices: jax.typing.ArrayLike,
  log_normalizer: jax.typing.ArrayLike | None,
  temperature: jax.typing.ArrayLike,
  tail: str,
  position_mask: jax.typing.ArrayLike | None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array, jax.Array | None]:
  """:func:`sparse_kd_loss`'s arguments checked (raising its errors) and cast, in :func:`_sparse_kd_loss`'s order."""
  # The arguments as given: under jit, jnp.asarray makes even NumPy constants tracers, which cannot be checked.
  given_indices, given_mask = topk_indices, position_mask
  _check_tail(tail)
  student_logits = as_float(student_logits)
  topk_logits = as_float(topk_logits)
  topk_indices = jnp.asarray(topk_indices)
  if log_normalizer is not None:
    log_normalizer = as_float(log_normalizer)
  _check_sparse_teacher(student_logits, topk_logits, topk_indices, log_normalizer)
  if tail == "bucket" and log_normalizer is None:
    raise ValueError(
      'tail="bucket" needs the teacher\'s log_normalizer (logsumexp of its logits / T over the full vocabulary, '
      'see teacher_topk); pass it, or use tail="renormalize".'
    )
  check_temperature(temperature)
  position_mask = check_position_mask(position_mask, student_logits.shape)
  _check_index_range(given_indices, student_logits.shape[-1], position_mask=given_mask)
  temperature = as_temperature(temperature, student_logits.dtype)
  # Cast before comparing: a uint16 index compared with -1 would be promoted, not tested. uint32 indices past the
  # int32 range wrap to negatives and are caught as out of range.
  topk_indices = topk_indices.astype(jnp.int32)
  return student_logits, topk_logits, topk_indices, log_normalizer, temperature, position_mask


# One compiled computation for the checked arguments: called eagerly, the loss compiles once per shape instead of
# once per primitive; under an outer jit it is inlined.
@functools.partial(jax.jit, static_argnames=("tail",))
def _sparse_kd_loss(
  student_logits: jax.Array,
  topk_logits: jax.Array,
  topk_indices: jax.Array,
  log_normalizer: jax.Array | None,
  temperature: jax.Array,
  position_mask: jax.Array | None,
  *,
  tail: str,
) -> jax.Array:
  """The arithmetic of :func:`sparse_kd_loss`: float32 logits, int32 indices, all arguments checked."""
  topk_logits = jax.lax.stop_gradient(topk_logits)
  if log_normalizer is not None:
    log_normalizer = jax.lax.stop_gradient(log_normalizer)
  vocab_size, k = student_logits.shape[-1], topk_logits.shape[-1]
  in_range = jnp.all((topk_indices >= 0) & (topk_indices < vocab_size), axis=-1)
  usable = in_range if position_mask is None else in_range & position_mask
  # Rows that are masked or out of range gather the distinct classes 0..k-1 and compute on zeros (the first where
  # of double-where): every local derivative stays finite, so the selects below leave a zero gradient, not NaN.
  topk_indices = jnp.where(usable[..., None], topk_indices, jnp.arange(k, dtype=jnp.int32))
  if position_mask is not None:
    student_logits = jnp.where(position_mask[..., None], student_logits, 0.0)
    topk_logits = jnp.where(position_mask[..., None], topk_logits, 0.0)
    if log_normalizer is not None:
      log_normalizer = jnp.where(position_mask, log_normalizer, 0.0)

  if tail == "renormalize":
    teacher_log_probs = jax.nn.log_softmax(topk_logits / temperature, axis=-1)  # [..., k]
    student_topk_logits = jnp.take_along_axis(student_logits, topk_indices, axis=-1)  # [..., k]
    student_log_probs = jax.nn.log_softmax(student_topk_logits / temperature, axis=-1)
    undefined = undefined_distribution(teacher_log_probs)
  else:
    teacher_log_probs, student_log_probs = _bucket_log_probs(
      student_logits, topk_logits, topk_indices, log_normalizer, temperature
    )
    undefined = jnp.any(jnp.isnan(teacher_log_probs) | jnp.isposinf(teacher_log_probs), axis=-1) | ~jnp.isfinite(
      log_normalizer
    )
  undefined = undefined | ~in_range
  # An undefined teacher row (say p_i = +inf from a +inf logit) would multiply the zero cotangent the final selects
  # leave it by an infinite derivative: it enters the sum as zero probabilities, and is made NaN afterwards.
  teacher_log_probs = jnp.where(undefined[..., None], -jnp.inf, teacher_log_probs)
  loss = temperature**2 * kl_terms(teacher_log_probs, student_log_probs)
  loss = nan_where(undefined, loss)
  if position_mask is not None:
    loss = jnp.where(position_mask, loss, 0.0)
  return loss


def _bucket_log_probs(
  student_logits: jax.Array,
  topk_logits: jax.Array,
  topk_indices: jax.Array,
  log_normalizer: jax.Array,
  temperature: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Teacher and student log-probabilities of the k classes and the tail bucket, ``[..., k + 1]`` each."""
  vocab_size = student_logits.shape[-1]
  teacher_log_probs = topk_logits / temperature - log_normalizer[..., None]  # [..., k]
  student_full = jax.nn.log_softmax(student_logits / temperature, axis=-1)  # [..., V]
  student_log_probs = jnp.take_along_axis(student_full, topk_indices, axis=-1)  # [..., k]

  outside = ~_scatter_mask(topk_indices, vocab_size)  # [..., V]
  has_tail = jnp.any(outside, axis=-1)
  # A row whose k indices cover the vocabulary has no tail: its logsumexp runs over every class (a finite stand-in)
  # and is replaced by -inf afterwards, and the teacher's rounding residue there is dropped with it.
  student_tail = jax.nn.logsumexp(student_full, axis=-1, where=outside | ~has_tail[..., None])
  student_tail = jnp.where(has_tail, student_tail, -jnp.inf)

  log_mass = jax.nn.logsumexp(teacher_log_probs, axis=-1)  # log sum_i p_i
  # p_tail = max(0, 1 - sum_i p_i); NaN mass (a NaN teacher) fails the test and is flagged by the caller.
  has_teacher_tail = has_tail & (log_mass < 0)
  teacher_tail = jnp.where(has_teacher_tail, _log1mexp(jnp.where(has_teacher_tail, log_mass, -1.0)), -jnp.inf)

  teacher_log_probs = jnp.concatenate([teacher_log_probs, teacher_tail[..., None]], axis=-1)
  student_log_probs = jnp.concatenate([student_log_probs, student_tail[..., None]], axis=-1)
  return teacher_log_probs, student_log_probs


def topk_bytes_per_token(
  k: int,
  *,
  logit_dtype: jax.typing.DTypeLike = "float16",
  index_dtype: jax.typing.DTypeLike = "uint16",
  with_normalizer: bool = True,
) -> int:
  r"""Bytes per token of a top-k teacher cache: k logits, k indices and a float32 log-normaliser.

  .. math::
    \mathrm{bytes} = k \,(b_\mathrm{logit} + b_\mathrm{index}) + 4 \cdot [\text{with normaliser}]

  against :math:`4V` for dense float32 logits (32,768 bytes at :math:`V = 8192`). ``uint16`` indices hold
  vocabularies up to 65,536; larger ones need ``int32``. ``tail="renormalize"`` of :func:`sparse_kd_loss` needs no
  normaliser (``with_normalizer=False``), ``tail="bucket"`` does.

  Args:
    k: the number of classes kept per token, >= 1.
    logit_dtype: a floating dtype for the stored logits (``"float16"``, ``"bfloat16"``, ``"float32"``).
    index_dtype: an integer dtype for the stored indices (``"uint16"``, ``"int32"``).
    with_normalizer: whether the float32 log-normaliser is stored too.

  Returns:
    The byte count, an int.

  >>> topk_bytes_per_token(8), topk_bytes_per_token(32), topk_bytes_per_token(32, index_dtype="int32")
  (36, 132, 196)
  >>> topk_bytes_per_token(8, with_normalizer=False), 4 * 8192  # renormalize-only cache; dense float32
  (32, 32768)
  """
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
    raise ValueError(f"k must be an integer >= 1, got {k!r}.")
  logit_dtype, index_dtype = jnp.dtype(logit_dtype), jnp.dtype(index_dtype)
  if not jnp.issubdtype(logit_dtype, jnp.floating):
    raise TypeError(f"logit_dtype must be a floating dtype, got {logit_dtype}.")
  if not jnp.issubdtype(index_dtype, jnp.integer):
    raise TypeError(f"index_dtype must be an integer dtype, got {index_dtype}.")
  normalizer_bytes = jnp.dtype(jnp.float32).itemsize if with_normalizer else 0
  return int(k) * (logit_dtype.itemsize + index_dtype.itemsize) + normalizer_bytes
