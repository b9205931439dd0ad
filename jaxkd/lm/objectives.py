"""Language-model distillation: token-level objectives, from a live teacher or a sparse top-k cache.

A language model's batch is ``{'tokens': int32 [batch, length], 'label': int32 [batch, length]}`` (the next
tokens; -100 is ignored as Hugging Face users pass it) and optionally ``'mask'`` (bool, False for padding). The
step (:func:`jaxkd.make_train_step`) averages every per-token loss over the real tokens of all devices, and reports
``perplexity``, ``teacher_perplexity`` and top-1 ``agreement`` beside the losses.

The pieces:

* :func:`lm_model` adapts a linen LM with ``hidden`` and ``logits_from_hidden`` methods (such as
  :class:`jaxkd.lm.transformer.TransformerLM`) to a :class:`jaxkd.Model` whose output head is separate, so that
  ``make_train_step(chunk_size=...)`` applies the vocabulary projection and the losses a chunk of positions at a
  time: the float32 ``[batch, length, vocab]`` logits and probabilities never exist whole.
* :func:`token_kd` (forward KL at :math:`T`, reverse KL, GKD's generalised JSD) and :func:`sparse_kd` (the
  teacher's top k tokens from a cache, :mod:`jaxkd.lm.topk_cache`) are per-token :class:`jaxkd.LossTerm`\\ s;
  :func:`lm_objective` mixes one of them with the cross-entropy on the labels.

Example (a live teacher; for the cache, build the batches with :class:`jaxkd.lm.topk_cache.JoinedSource`)::

  student = jaxkd.lm.lm_model(TransformerLM(**lm_config('student', vocab_size=8192, max_len=128)))
  teacher = jaxkd.lm.lm_model(teacher_module)
  state = jaxkd.create_train_state(student, optax.adamw(1e-3), {'tokens': tokens[:2]}, rng=0)
  step = jaxkd.make_train_step(
    teacher_apply_fn=teacher, objective=jaxkd.lm.lm_objective('forward', alpha=0.5), chunk_size=32
  )
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import numpy as np

from jaxkd import _checks, losses
from jaxkd import objective as objective_lib
from jaxkd.modeling import Model

__all__ = ["lm_model", "token_kd", "sparse_kd", "lm_objective", "KINDS", "TOPK_KEYS"]

PyTree = Any
Kind = Literal["forward", "reverse", "gjsd", "topk"]
KINDS = ("forward", "reverse", "gjsd", "topk")
# The batch entries a top-k cache adds (jaxkd.lm.topk_cache.JoinedSource), read by sparse_kd.
TOPK_KEYS = objective_lib.TOPK_KEYS


class _Head:
  """``head(variables, hidden) -> logits`` of a linen LM: its ``logits_from_hidden`` method (hashable, comparable)."""

  def __init__(self, module: nn.Module, method: str):
    self.module, self.method = module, method

  def __call__(self, variables: PyTree, hidden: jax.Array) -> jax.Array:
    return self.module.apply({"params": variables["params"]}, hidden, method=getattr(self.module, self.method))

  def __eq__(self, other: object) -> bool:
    return isinstance(other, _Head) and (self.module, self.method) == (other.module, other.method)

  def __hash__(self) -> int:
    return hash((self.module, self.method))


class _Hidden(_Head):
  """``apply_fn(variables, tokens, **kwargs) -> hidden``: the module's ``hidden`` method through ``apply``."""

  def __call__(self, variables: PyTree, *args: Any, **kwargs: Any) -> Any:
    return self.module.apply(variables, *args, method=getattr(self.module, self.method), **kwargs)


def lm_model(
  module: nn.Module,
  *,
  inputs: Sequence[str] = ("tokens",),
  hidden_method: str = "hidden",
  head_method: str = "logits_from_hidden",
  name: str = "model",
) -> Model:
  """A :class:`jaxkd.Model` of a linen language model whose output head the step applies itself.

  ``module.hidden(tokens, train=...)`` must return the final hidden states ``[batch, length, d]`` and
  ``module.logits_from_hidden(hidden)`` the logits; ``module(tokens)`` (used to initialise it) must create every
  parameter. For an NNX model, build ``jaxkd.Model(apply_fn, inputs=('tokens',), head=...)`` from
  :func:`jaxkd.from_nnx` the same way: ``apply_fn`` returning the hidden states, ``head(variables, hidden)``.

  Raises:
    ValueError: the module lacks one of the two methods.
  """
  missing = [m for m in (hidden_method, head_method) if not callable(getattr(module, m, None))]
  if missing:
    raise ValueError(
      f"{type(module).__name__} has no method(s) {missing}: an LM for lm_model needs hidden(tokens, train=...) -> "
      "[batch, length, d] and logits_from_hidden(hidden) -> logits (name them with hidden_method=/head_method=)."
    )
  train_flag = "train"
  return Model(
    apply_fn=_Hidden(module, hidden_method),
    inputs=tuple(inputs),
    train_flag=train_flag,
    linen_module=module,
    name=name,
    takes_rngs=True,
    head=_Head(module, head_method),
  )


def token_kd(
  kind: Literal["forward", "reverse", "gjsd"] = "forward",
  *,
  temperature: objective_lib.Schedule = 1.0,
  beta: float = 0.5,
  weight: objective_lib.Schedule = 1.0,
  name: str | None = None,
) -> objective_lib.LossTerm:
  r"""A per-token distillation term against the teacher's full distribution.

  * ``'forward'``: :math:`T^2\,\mathrm{KL}(p_T \| q_T)` (Hinton; :func:`jaxkd.losses.kd_loss`), mean-seeking;
  * ``'reverse'``: :math:`T^2\,\mathrm{KL}(q_T \| p_T)` (MiniLLM; :func:`jaxkd.losses.reverse_kl_loss`),
    mode-seeking;
  * ``'gjsd'``: GKD's generalised Jensen-Shannon divergence with ``beta`` (:func:`jaxkd.losses.generalized_jsd_loss`).

  with :math:`p` the teacher's and :math:`q` the student's next-token distribution. Padding and -100 labels are
  left out by the step's mask.
  """
  if kind not in ("forward", "reverse", "gjsd"):
    raise ValueError(f"kind must be 'forward', 'reverse' or 'gjsd', got {kind!r} (the top-k cache is sparse_kd).")
  _checks.check_temperature_or_schedule(temperature)
  if kind == "gjsd":
    _checks.check_open_unit_interval(beta, "beta", " (GKD's mixture weight; 0.5 is the symmetric JSD)")

  def fn(inputs: objective_lib.TermInputs) -> jax.Array:
    t = objective_lib.value_at(temperature, inputs.step)
    if kind == "forward":
      return losses.kd_loss(inputs.student_logits, inputs.teacher_logits, t)
    if kind == "reverse":
      return losses.reverse_kl_loss(inputs.student_logits, inputs.teacher_logits, temperature=t)
    return losses.generalized_jsd_loss(inputs.student_logits, inputs.teacher_logits, beta=beta, temperature=t)

  return objective_lib.LossTerm(name or kind, fn, weight)


def sparse_kd(
  *,
  temperature: float = 1.0,
  tail: str = "renormalize",
  weight: objective_lib.Schedule = 1.0,
  name: str = "topk",
) -> objective_lib.LossTerm:
  """A per-token KD term against the teacher's top k tokens read from the batch (a top-k cache).

  Reads ``batch['teacher_topk_logits']`` ``[batch, length, k]`` (16-bit), ``batch['teacher_topk_indices']`` and
  ``batch['teacher_log_normalizer']`` ``[batch, length]`` (:class:`jaxkd.lm.topk_cache.JoinedSource` adds them) and
  computes :func:`jaxkd.losses.sparse_kd_loss` with ``tail='renormalize'`` (the default, the teacher's top
  k renormalised) or ``'bucket'`` (the rest as one class; needs the normaliser at the cache's temperature). It needs
  no teacher network in the step: a cached step costs what a scratch step costs plus one gather.

  With ``tail='bucket'`` the normaliser must be the one at ``temperature``: the step checks it on the host, before
  each step, against ``batch['teacher_topk_temperature']`` (float32 ``[batch]``, the cache's temperature, which
  :class:`jaxkd.lm.topk_cache.JoinedSource` adds) and raises ValueError when they differ. A batch without that
  entry, or one already on the devices, is not checked. ``'renormalize'`` holds at any temperature.
  """
  if tail not in losses.TAIL_MODES:
    raise ValueError(f"tail must be one of {losses.TAIL_MODES}, got {tail!r}.")
  _checks.check_temperature(temperature)

  def fn(inputs: objective_lib.TermInputs) -> jax.Array:
    missing = [key for key in TOPK_KEYS[:2] if key not in inputs.batch]
    if missing:
      raise ValueError(
        f"the sparse_kd term reads {list(TOPK_KEYS)} from the batch, which has no {missing} (it has "
        f"{sorted(inputs.batch)}); join the token batches with the cache (jaxkd.lm.topk_cache.JoinedSource)."
      )
    if tail == "renormalize" and inputs.batch["teacher_topk_logits"].shape[-1] == 1:
      raise ValueError(
        "sparse_kd with k = 1 and tail='renormalize' is identically 0 (both distributions renormalised over one "
        "token are the same point mass), so the student would train as from scratch: use tail='bucket'."
      )
    return losses.sparse_kd_loss(
      inputs.student_logits,
      inputs.batch["teacher_topk_logits"],
      inputs.batch["teacher_topk_indices"],
      inputs.batch.get("teacher_log_normalizer"),
      temperature=temperature,
      tail=tail,
    )

  check = functools.partial(_check_cache_temperature, temperature=temperature) if tail == "bucket" else None
  return objective_lib.LossTerm(name, fn, weight, needs_teacher=False, check_batch=check)


def _check_cache_temperature(batch: Mapping[str, Any], *, temperature: float) -> None:
  """ValueError when the batch's host-side record of the normaliser's temperature is not the term's."""
  recorded = batch.get(objective_lib.TOPK_TEMPERATURE)
  if not isinstance(recorded, np.ndarray | np.generic) or not np.size(recorded):
    return
  found = [float(t) for t in np.unique(recorded)]
  if found == [float(np.float32(temperature))]:
    return
  what = f"batch['{objective_lib.TOPK_TEMPERATURE}']"
  if len(found) > 1:
    raise ValueError(
      f"the batch mixes log-normalisers at temperatures {found[:5]} ({what}): it was joined from caches written at "
      f"different temperatures, and sparse_kd(tail='bucket', temperature={temperature}) can match only one. Join "
      "every batch from caches written at one temperature."
    )
  raise ValueError(
    f"sparse_kd(tail='bucket', temperature={temperature}) takes the tail's mass from the cached log-normaliser, but "
    f"the cache's temperature is {found[0]!r} ({what}): the tail would be normalised at the wrong temperature and "
    f"the loss silently wrong. Pass temperature={found[0]!r} to sparse_kd / lm_objective, or write a cache at "
    f"temperature={temperature} (write_topk_cache, under a new key)."
  )


def lm_objective(
  kind: Kind = "forward",
  *,
  alpha: float = 0.5,
  temperature: float = 1.0,
  beta: float = 0.5,
  tail: str = "renormalize",
) -> objective_lib.Objective:
  """``alpha`` x a distillation term + ``(1 - alpha)`` x cross-entropy on the next tokens.

  ``kind`` is ``'forward'``, ``'reverse'``, ``'gjsd'`` (:func:`token_kd`, a live teacher) or ``'topk'``
  (:func:`sparse_kd`, a top-k cache with ``tail``; with ``'bucket'`` its ``temperature`` must be the cache's, which
  the step checks). ``alpha=1`` drops the cross-entropy (pure distillation).
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
  _checks.check_alpha(alpha)
  kd_weight = np.float32(alpha)
  if kind == "topk":
    term = sparse_kd(temperature=temperature, tail=tail, weight=kd_weight)
  else:
    term = token_kd(kind, temperature=temperature, beta=beta, weight=kd_weight)
  terms = [term]
  if alpha < 1:
    terms.insert(0, objective_lib.cross_entropy(weight=np.float32(1.0) - kd_weight))
  return objective_lib.Objective(tuple(terms), name=f"lm-{kind}", temperature=temperature)
