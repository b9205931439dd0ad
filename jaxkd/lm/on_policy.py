r"""On-policy distillation (GKD) and sequence-level KD: whose continuation of each prompt the student learns on.

Training only on fixed sequences never shows the student its own mistakes (exposure bias). Generalised knowledge
distillation (Agarwal et al., ICLR 2024) lets the student continue the prompts itself for a fraction
:math:`\lambda` of the batches and has the teacher score every token of those continuations with the generalised
JSD(:math:`\beta`); sequence-level KD (Kim and Rush 2016) trains on the teacher's own continuations instead.
:class:`Completions` builds the token batch of one step from ``{'prompt', 'completion'}``:

* with probability ``lam`` (decided per step from ``(seed, step)`` alone), the continuation is sampled with the
  KV-cached sampler (:func:`jaxkd.lm.transformer.sample`) from the ``source`` model, the student (GKD) or the
  teacher (sequence-level KD), at ``temperature`` (0: greedy), ``max_new_tokens`` long;
* otherwise it is the batch's own ``completion`` (supervised KD on the data); ``lam=0`` is exactly the supervised
  token step.

The result is the ordinary language-model batch ``{'tokens', 'label', 'mask'}`` of ``prompt + continuation``, for
:func:`jaxkd.make_train_step` with a live teacher and ``jaxkd.lm.lm_objective('gjsd', alpha=1, beta=...)``. The
mask keeps the continuation's tokens only: the prompt is given, not learned, and every token after the first
``eos_id`` is padding. Sampled tokens are integer inputs of the step, so no gradient flows into the sampling
(GKD's on-policy gradient ignores it too). Use ``alpha=1`` when continuations are generated: a cross-entropy on
the student's own samples would teach it to repeat them.

Generation runs beside the compiled step (one jitted sampler call per generated batch, about 1.8-2.2x a
supervised step in the paper; ``benchmarks.sharded`` times the sampler). Its key is ``fold_in(key(seed), step)``,
so a resumed run draws the same continuations and stays bit-exact. Prompts of one batch share a length (bucket
variable-length prompts by length, or left-align them and accept padding tokens as context).

Example::

  completions = jaxkd.lm.on_policy.Completions(student_module, teacher_module, lam=0.5, max_new_tokens=16, eos_id=eos)
  step = jaxkd.make_train_step(teacher_apply_fn=jaxkd.lm.lm_model(teacher_module),
                               objective=jaxkd.lm.lm_objective('gjsd', alpha=1.0, beta=0.5))
  for batch in prompts_and_answers:
    token_batch, generated = completions(batch, step=int(state.step), student_params=state.params,
                                         teacher_params=teacher_variables['params'])
    state, metrics = step(state, teacher_variables, token_batch)
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxkd.lm import transformer

__all__ = ["Completions", "completion_mask", "token_batch"]

PyTree = Any
SOURCES = ("student", "teacher")


def completion_mask(completion: np.ndarray, *, eos_id: int | None, valid: np.ndarray | None = None) -> np.ndarray:
  """``[batch, length]`` bool: the tokens of each continuation up to and including its first ``eos_id``."""
  keep = np.ones(completion.shape, bool) if valid is None else np.asarray(valid, bool).copy()
  if eos_id is not None:
    is_eos = completion == eos_id
    # Positions strictly after the first EOS: an EOS occurred at an earlier position.
    after_eos = np.cumsum(is_eos, axis=1) - is_eos > 0
    keep &= ~after_eos
  return keep


def token_batch(
  prompt: np.ndarray, completion: np.ndarray, keep: np.ndarray, *, pad_id: int = 0
) -> dict[str, np.ndarray]:
  """The next-token batch of ``prompt + completion`` whose loss covers the kept completion tokens only.

  Returns ``{'tokens': [batch, P + C - 1], 'label': [batch, P + C - 1], 'mask': [batch, P + C - 1]}``: label ``j``
  is token ``j + 1`` of the sequence, counted when it is a kept completion token (``j >= P - 1``). Dropped
  completion tokens are replaced by ``pad_id`` so that nothing after an EOS reaches any position's context.
  """
  completion = np.where(keep, completion, pad_id).astype(np.int32)
  sequence = np.concatenate([np.asarray(prompt, np.int32), completion], axis=1)
  prompt_len = prompt.shape[1]
  mask = np.concatenate([np.zeros((prompt.shape[0], prompt_len - 1), bool), keep], axis=1)
  return {"tokens": sequence[:, :-1], "label": sequence[:, 1:], "mask": mask}


@dataclasses.dataclass(frozen=True)
class Completions:
  """Per step: the batch's own continuations, or (with probability ``lam``) ones sampled from ``source``.

  Attributes:
    student: the student's :class:`jaxkd.lm.transformer.TransformerLM`.
    teacher: the teacher's (needed for ``source='teacher'``).
    lam: fraction of steps whose continuations are generated (GKD's :math:`\\lambda`); 0 is supervised KD, 1 is
      fully on-policy (or sequence-level KD with ``source='teacher'``).
    max_new_tokens: continuation length; the batch's ``completion`` must have this many columns.
    source: ``'student'`` (on-policy, GKD) or ``'teacher'`` (sequence-level KD).
    temperature: sampling temperature (0: greedy).
    eos_id: the end-of-sequence token: the loss stops after the first one (None: continuations run to the end).
    pad_id: what replaces tokens after an EOS (default ``eos_id``, else 0).
    seed: with the step number, decides which steps generate and the sampling keys.
  """

  student: transformer.TransformerLM
  teacher: transformer.TransformerLM | None = None
  lam: float = 0.5
  max_new_tokens: int = 16
  source: str = "student"
  temperature: float = 1.0
  eos_id: int | None = None
  pad_id: int | None = None
  seed: int = 0

  def __post_init__(self):
    if not isinstance(self.lam, numbers.Real) or not 0 <= float(self.lam) <= 1:
      raise ValueError(f"lam must be a number in [0, 1] (the fraction of generated batches), got {self.lam!r}.")
    if self.source not in SOURCES:
      raise ValueError(f"source must be one of {SOURCES} (GKD or sequence-level KD), got {self.source!r}.")
    if self.source == "teacher" and self.teacher is None:
      raise ValueError("source='teacher' (sequence-level KD) needs the teacher module: Completions(student, teacher).")
    if not isinstance(self.max_new_tokens, numbers.Integral) or self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}.")
    if not isinstance(self.temperature, numbers.Real) or not float(self.temperature) >= 0:
      raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {self.temperature!r}.")
    vocab = self.student.vocab_size
    for name in ("eos_id", "pad_id"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, numbers.Integral) or not 0 <= value < vocab):
        raise ValueError(f"{name} must be None or a token id in [0, {vocab}), got {value!r}.")

  @property
  def generator(self) -> transformer.TransformerLM:
    return self.teacher if self.source == "teacher" else self.student

  def generates(self, step: int) -> bool:
    """Whether step ``step`` trains on generated continuations (a function of ``(seed, step)`` only)."""
    if self.lam == 0:
      return False
    if self.lam == 1:
      return True
    return bool(np.random.default_rng([self.seed, int(step)]).random() < self.lam)

  def __call__(
    self,
    batch: Mapping[str, Any],
    *,
    step: int,
    student_params: PyTree = None,
    teacher_params: PyTree = None,
  ) -> tuple[dict[str, np.ndarray], bool]:
    """The token batch of step ``step`` and whether its continuations were generated.

    Args:
      batch: ``{'prompt': int [batch, P], 'completion': int [batch, max_new_tokens]}`` and optionally
        ``'completion_mask'`` (bool, False for padding of the data's continuations).
      step: the train state's step (``int(state.step)``), which with ``seed`` fixes the choice and the key.
      student_params: the student's parameters (needed when it generates).
      teacher_params: the teacher's (needed for ``source='teacher'``).
    """
    prompt, completion = self._check(batch)
    generated = self.generates(step)
    if generated:
      params = teacher_params if self.source == "teacher" else student_params
      if params is None:
        raise ValueError(f"step {step} generates with the {self.source}: pass {self.source}_params=.")
      key = jax.random.fold_in(jax.random.key(self.seed), int(step))
      tokens = transformer.sample(
        self.generator,
        params,
        prompt,
        max_new_tokens=int(self.max_new_tokens),
        rng=key,
        temperature=float(self.temperature),
      )
      completion = np.asarray(jax.device_get(tokens))[:, prompt.shape[1] :]
      keep = completion_mask(completion, eos_id=self.eos_id)
    else:
      keep = completion_mask(completion, eos_id=self.eos_id, valid=batch.get("completion_mask"))
    pad = self.pad_id if self.pad_id is not None else (self.eos_id if self.eos_id is not None else 0)
    return token_batch(prompt, completion, keep, pad_id=pad), generated

  def _check(self, batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    missing = [key for key in ("prompt", "completion") if key not in batch]
    if missing:
      raise ValueError(f"an on-policy batch needs 'prompt' and 'completion'; it lacks {missing} (has {sorted(batch)}).")
    prompt, completion = np.asarray(batch["prompt"]), np.asarray(batch["completion"])
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not np.issubdtype(prompt.dtype, np.integer):
      raise ValueError(f"batch['prompt'] must be int [batch, prompt_len >= 1], got {prompt.dtype} {prompt.shape}.")
    if completion.shape != (prompt.shape[0], self.max_new_tokens):
      raise ValueError(
        f"batch['completion'] must be [batch, max_new_tokens] = {(prompt.shape[0], self.max_new_tokens)}, got "
        f"{completion.shape}; pad the data's continuations to max_new_tokens (and mark padding in 'completion_mask')."
      )
    if "completion_mask" in batch and np.shape(batch["completion_mask"]) != completion.shape:
      raise ValueError(
        f"batch['completion_mask'] must have the completion's shape {completion.shape}, got "
        f"{np.shape(batch['completion_mask'])}."
      )
    for model in (self.student, self.teacher):
      if model is None:
        continue
      length = prompt.shape[1] + self.max_new_tokens
      if length > model.max_len:
        raise ValueError(
          f"prompt length {prompt.shape[1]} + max_new_tokens {self.max_new_tokens} = {length} exceeds max_len="
          f"{model.max_len} of a model here; shorten the prompts (or max_new_tokens) or build the models longer."
        )
    return prompt.astype(np.int32), completion.astype(np.int32)
