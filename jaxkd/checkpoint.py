"""Checkpoints with orbax: resume exactly, load teachers and students' variables.

A checkpoint step directory holds five orbax items:

- ``model``: ``{'params', 'batch_stats'}``, all that inference or a teacher needs;
- ``train``: ``{'opt_state', 'step', 'rng', 'adapters', 'term_state'}``, the rest of the student's
  :class:`jaxkd.TrainState` (the key stored as raw key data);
- ``data``: the input iterator's position (JSON), so a resumed run sees the
  same batches an uninterrupted one would;
- ``config``: the run's resolved config (JSON);
- ``meta``: provenance (JSON): e.g. which teacher checkpoint the student learned from.

Splitting ``model`` from ``train`` lets a teacher or an exported student be read
without its optimizer state. Saves are asynchronous (orbax writes in the background
while training goes on); orbax writes each step into a temporary directory and
renames it when complete, so a save killed half-way is never taken for a checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxkd.utils import tree_fingerprint

__all__ = [
  "Checkpointer",
  "CheckpointMismatchError",
  "Restored",
  "fingerprint",
  "load_variables",
]

log = logging.getLogger(__name__)

PyTree = Any


class CheckpointMismatchError(ValueError):
  """A checkpoint's arrays do not match the model/state they are restored into."""


@dataclasses.dataclass
class Restored:
  """What :meth:`Checkpointer.restore` gives back."""

  state: Any
  step: int
  data_state: Any = None
  config: Any = None
  meta: Any = None


def fingerprint(tree: PyTree) -> str:
  """A short (16 hex digits) SHA-256 of a pytree's structure, shapes, dtypes and values.

  Used to record which teacher a student learned from; any changed parameter
  changes it. The teacher-logit cache keys on the full digest of the same hash.
  """
  return tree_fingerprint(tree)[:16]


def _to_host(tree: PyTree) -> PyTree:
  """NumPy copies: orbax then writes each array once (process 0), whatever the devices held."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _split_state(state: Any) -> tuple[dict, dict]:
  rng = state.rng
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  model = {"params": state.params, "batch_stats": state.batch_stats}
  # Adapters and term states train with the student but are not part of it: the train item, like the optimizer.
  train = {
    "opt_state": state.opt_state,
    "step": state.step,
    "rng": rng,
    "adapters": getattr(state, "adapters", {}),
    "term_state": getattr(state, "term_state", {}),
  }
  return _to_host(model), _to_host(train)


def _path_name(path: tuple) -> str:
  """``params/Dense_0/kernel``: one spelling for dict keys, attributes and indices.

  Orbax's metadata turns NamedTuples (optax states) into dicts, so paths are
  compared by their names, not their key types.
  """
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _shape_mismatches(saved: PyTree, template: PyTree, item: str) -> str | None:
  """Describes the first path where ``saved`` metadata and ``template`` differ, or None."""
  has_shape = lambda x: hasattr(x, "shape")  # noqa: E731
  saved_leaves = {_path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved, is_leaf=has_shape)[0]}
  template_leaves = {_path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(template)[0]}
  for path, leaf in template_leaves.items():
    if path not in saved_leaves:
      return f"{item}/{path} is in the model but not in the checkpoint"
    saved_shape = tuple(saved_leaves[path].shape)
    if saved_shape != tuple(np.shape(leaf)):
      return f"{item}/{path} has shape {saved_shape} in the checkpoint but {tuple(np.shape(leaf))} in the model"
  for path in saved_leaves:
    if path not in template_leaves:
      return f"{item}/{path} is in the checkpoint but not in the model"
  return None


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
  # Naming the handlers lets a fresh process read item metadata before any save or restore.
  handlers = {"model": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler()}
  handlers.update({name: ocp.JsonCheckpointHandler() for name in ("data", "config", "meta")})
  return handlers


class Checkpointer:
  """An orbax ``CheckpointManager`` for a student run: keep the last K and the best, resume the latest.

  Args:
    directory: where step directories go (created if missing).
    max_to_keep: how many of the most recent checkpoints to keep.
    best_metric: name of a metric passed to :meth:`save`; the best checkpoint by
      it is kept as well, whatever its age. None keeps only the last K.
    best_mode: ``'max'`` or ``'min'``.
    async_save: write in a background thread while training continues.
  """

  ITEMS = ("model", "train", "data", "config", "meta")

  def __init__(
    self,
    directory: os.PathLike | str,
    *,
    max_to_keep: int = 3,
    best_metric: str | None = None,
    best_mode: str = "max",
    async_save: bool = True,
  ):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
    self.directory = pathlib.Path(directory).expanduser().absolute()
    self.best_metric = best_metric
    self.best_mode = best_mode
    policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
    if best_metric is not None:
      policies.append(
        ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric],
          reverse=best_mode == "min",
          n=1,
          keep_checkpoints_without_metrics=False,
        )
      )
    options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=async_save,
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      # best_fn only makes orbax write each step's metrics to disk, so that the best
      # checkpoint is still known after a restart; the policy above decides what is kept.
      best_fn=(lambda metrics: metrics[best_metric]) if best_metric is not None else None,
      best_mode=best_mode,
      create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_item_handlers())

  # ------------------------------------------------------------------ queries

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the best ``best_metric`` among kept checkpoints (None without metrics)."""
    if self.best_metric is None:
      return None
    scored = []
    for step in self.all_steps():
      metrics = self._manager.metrics(step)
      if metrics and self.best_metric in metrics:
        scored.append((float(metrics[self.best_metric]), step))
    if not scored:
      return None
    return (max if self.best_mode == "max" else min)(scored)[1]

  def incomplete_steps(self) -> list[str]:
    """Step directories orbax never finalised (a save killed half-way)."""
    if not self.directory.exists():
      return []
    return sorted(p.name for p in self.directory.iterdir() if p.is_dir() and ".orbax-checkpoint-tmp" in p.name)

  # ------------------------------------------------------------------ save

  def save(
    self,
    state: Any,
    *,
    data_state: Any = None,
    config: Any = None,
    meta: Any = None,
    metrics: Mapping[str, float] | None = None,
    force: bool = True,
  ) -> bool:
    """Saves an (unreplicated) :class:`jaxkd.TrainState` at ``state.step``; returns whether it saved.

    The host copy is taken before returning, so the caller may donate ``state``
    to the next step at once; the write itself runs in the background.
    """
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      return False
    model, train = _split_state(state)
    args = ocp.args.Composite(
      model=ocp.args.StandardSave(model),
      train=ocp.args.StandardSave(train),
      data=ocp.args.JsonSave(data_state if data_state is not None else {}),
      config=ocp.args.JsonSave(_jsonable(config) if config is not None else {}),
      meta=ocp.args.JsonSave(_jsonable(meta) if meta is not None else {}),
    )
    clean_metrics = {k: float(v) for k, v in (metrics or {}).items()}
    if self.best_metric is not None and self.best_metric not in clean_metrics:
      # Orbax's BestN needs a metric on every checkpoint it ranks; checkpoints without one rank last.
      clean_metrics[self.best_metric] = float("-inf") if self.best_mode == "max" else float("inf")
    return self._manager.save(step, args=args, metrics=clean_metrics or None, force=force)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  # ------------------------------------------------------------------ restore

  def check_compatible(self, state_template: Any, step: int, metadata: Any = None) -> None:
    """Raises :class:`CheckpointMismatchError` naming the first array whose shape differs."""
    metadata = self._manager.item_metadata(step) if metadata is None else metadata
    model_template, train_template = _split_state(state_template)
    for item, template in (("model", model_template), ("train", train_template)):
      saved = metadata[item]
      saved = getattr(saved, "tree", saved)
      problem = _shape_mismatches(saved, template, item)
      if problem:
        raise CheckpointMismatchError(
          f"checkpoint {self.directory / str(step)} does not match the model: {problem}. "
          "Use a new workdir for a different model, or restore the model the checkpoint was made with."
        )

  def restore(self, state_template: Any, step: int | None = None) -> Restored | None:
    """Restores the latest complete checkpoint (or ``step``) into the structure of ``state_template``.

    Returns None when the directory has no checkpoint. A checkpoint that fails
    to read (e.g. files damaged after it was finalised) is skipped for the
    previous one, with a warning; a checkpoint whose shapes differ from
    ``state_template`` raises :class:`CheckpointMismatchError` instead, since
    falling back would silently train a different model.
    """
    for name in self.incomplete_steps():
      log.warning("ignoring incomplete checkpoint %s (a save was interrupted)", self.directory / name)
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    errors = []
    for candidate in steps:
      try:
        metadata = self._manager.item_metadata(candidate)
        if metadata["model"] is None or metadata["train"] is None:
          raise FileNotFoundError("its model or train item is missing")
      except Exception as error:  # noqa: BLE001 - unreadable metadata: treat like an unreadable checkpoint
        metadata = error
      if not isinstance(metadata, Exception):
        # Outside the try: a model mismatch must stop the run, not fall back to an older checkpoint.
        self.check_compatible(state_template, candidate, metadata)
      try:
        if isinstance(metadata, Exception):
          raise metadata
        return self._restore_step(state_template, candidate)
      except Exception as error:  # noqa: BLE001 - any read failure means: try the previous checkpoint
        message = f"checkpoint step {candidate} in {self.directory} could not be read ({type(error).__name__}: {error})"
        if step is not None:
          raise RuntimeError(message) from error
        log.warning("%s; falling back to the previous checkpoint", message)
        print(f"jaxkd: {message}; falling back to the previous checkpoint", flush=True)
        errors.append(message)
    if errors:
      raise RuntimeError("no checkpoint could be read: " + "; ".join(errors))
    return None

  def _restore_step(self, state_template: Any, step: int) -> Restored:
    model_template, train_template = _split_state(state_template)
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        model=ocp.args.StandardRestore(model_template),
        train=ocp.args.StandardRestore(train_template),
        data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
      ),
    )
    model, train = restored["model"], restored["train"]
    rng = train["rng"]
    if jax.dtypes.issubdtype(state_template.rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.wrap_key_data(rng, impl=jax.random.key_impl(state_template.rng))
    state = state_template.replace(
      params=model["params"],
      batch_stats=model["batch_stats"],
      opt_state=train["opt_state"],
      step=np.asarray(train["step"], dtype=np.asarray(state_template.step).dtype),
      rng=rng,
      adapters=train.get("adapters", {}),
      term_state=train.get("term_state", {}),
    )
    return Restored(
      state=state, step=step, data_state=restored["data"], config=restored["config"], meta=restored["meta"]
    )


def _jsonable(value: Any) -> Any:
  if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray)):
    return np.asarray(value).tolist()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return repr(value)


def load_variables(path: os.PathLike | str, *, step: int | None = None) -> tuple[dict, dict]:
  """Reads only ``{'params', 'batch_stats'}`` of a jaxkd checkpoint (a teacher, or a student for inference).

  Args:
    path: a run's checkpoint directory (the latest step is taken) or one step's
      directory (``.../checkpoints/1200``).
    step: a step to read from a checkpoint directory.

  Returns:
    ``(variables, info)`` where ``info`` has ``path``, ``step`` and
    ``fingerprint`` (of the variables), to record provenance.

  Raises:
    FileNotFoundError: naming the path when it holds no complete checkpoint.
  """
  path = pathlib.Path(path).expanduser().absolute()
  if step is None and path.name.isdigit() and (path / "model").is_dir():
    path, step = path.parent, int(path.name)
  if not path.is_dir():
    raise FileNotFoundError(f"no checkpoint directory at {path}")
  manager = ocp.CheckpointManager(
    path, item_names=Checkpointer.ITEMS, options=ocp.CheckpointManagerOptions(read_only=True)
  )
  try:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      found = list(manager.all_steps())
      raise FileNotFoundError(
        f"no complete checkpoint{'' if step is None else f' for step {step}'} in {path} (steps found: {found})"
      )
    model = manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore()))["model"]
  finally:
    manager.close()
  variables = {"params": model["params"], "batch_stats": model.get("batch_stats", {}) or {}}
  return variables, {"path": str(path), "step": int(step), "fingerprint": fingerprint(variables)}
