"""Checkpoints with orbax: resume exactly, load teachers and students' variables.

A checkpoint step directory holds six orbax items:

- ``model``: ``{'params', 'batch_stats'}``, all that inference or a teacher needs;
- ``train``: ``{'opt_state', 'step', 'rng', 'adapters', 'term_state'}``, the rest of the student's
  :class:`jaxkd.TrainState` (the key stored as raw key data);
- ``data``: the input iterator's position (JSON), so a resumed run sees the same batches an uninterrupted one would;
- ``config``: the run's resolved config (JSON);
- ``meta``: provenance (JSON): e.g. which teacher checkpoint the student learned from;
- ``integrity``: SHA-256 digests of the ``model`` and ``train`` arrays (JSON), checked on every read.

Splitting ``model`` from ``train`` lets a teacher or an exported student be read without its optimizer state.
Saves are asynchronous (orbax writes in the background while training goes on); orbax writes each step into a
temporary directory and renames it when complete, so a save killed half-way is never taken for a checkpoint.

Orbax (0.12.8) checks the CRC-32C of its OCDBT b-tree nodes, which hold small arrays inline, but not of the data
files that hold larger arrays: flipped bytes there restore silently. Hence the ``integrity`` item. A checkpoint
that cannot be read or fails that check is skipped for the previous one, and :meth:`Checkpointer.restore` moves it
aside into ``damaged/`` so that the retrained step can be saved again.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import logging
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxkd.artifacts import ArtifactError, tree_fingerprint

__all__ = [
  "CheckpointDirectoryError",
  "CheckpointIntegrityError",
  "Checkpointer",
  "CheckpointMismatchError",
  "Restored",
  "load_variables",
  "stored_json",
]

log = logging.getLogger(__name__)
PyTree = Any


class CheckpointMismatchError(ArtifactError):
  """A checkpoint's arrays do not match the model/state they are restored into (a ValueError)."""


class CheckpointIntegrityError(ArtifactError):
  """A checkpoint's arrays differ from the SHA-256 recorded when it was saved: its files changed on disk."""


class CheckpointDirectoryError(OSError):
  """The checkpoint directory cannot be created or written."""


# Where Checkpointer.restore moves checkpoints it could not read; orbax only takes names that are numbers as steps.
DAMAGED_DIR = "damaged"
_INTEGRITY_VERSION = 1


@dataclasses.dataclass
class Restored:
  """What :meth:`Checkpointer.restore` gives back."""

  state: Any
  step: int
  data_state: Any = None
  config: Any = None
  meta: Any = None


# Digits of :func:`jaxkd.artifacts.tree_fingerprint` that :func:`load_variables` records as a checkpoint's
# provenance (``info['fingerprint']``); runs record it, so its length stays what it was.
FINGERPRINT_DIGITS = 16


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
  """``params/Dense_0/kernel``: one spelling for dict keys, attributes and indices (orbax's metadata turns
  NamedTuples, optax states, into dicts, so paths are compared by their names, not their key types)."""
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
  handlers.update({name: ocp.JsonCheckpointHandler() for name in ("data", "config", "meta", "integrity")})
  return handlers


def _integrity_digest(tree: PyTree) -> str:
  """SHA-256 of a tree's leaves keyed by their path names.

  Keyed by names rather than the tree's structure because orbax gives NamedTuples (optax states) back as dicts
  when read without a template, and drops empty containers; the digest of what was saved and of what was read
  must agree whenever the arrays do.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return tree_fingerprint({_path_name(path): np.asarray(leaf) for path, leaf in leaves})


def _check_integrity(step_dir: pathlib.Path, items: Mapping[str, PyTree], recorded: Any) -> None:
  """Raises :class:`CheckpointIntegrityError` naming the first item whose digest is not the recorded one."""
  if not recorded:
    log.debug("%s has no integrity record (saved before jaxkd recorded one): its arrays are not verified", step_dir)
    return
  if recorded.get("version") != _INTEGRITY_VERSION:
    log.warning("%s has an integrity record of unknown version %r: not verified", step_dir, recorded.get("version"))
    return
  for name, tree in items.items():
    actual = _integrity_digest(tree)
    if recorded.get(name) is not None and actual != recorded[name]:
      raise CheckpointIntegrityError(
        f"checkpoint {step_dir}: the arrays of its {name!r} item do not match the SHA-256 recorded when it was saved "
        f"(recorded {recorded[name][:16]}..., read {actual[:16]}...); its files were changed or damaged on disk."
      )


def _check_writable(directory: pathlib.Path) -> None:
  """Creates ``directory`` and writes a probe file in it, so that a directory orbax cannot write fails now.

  Without this an unwritable directory surfaces at the first background save and then stalls orbax's cleanup
  for minutes before a TimeoutError that does not name the cause.
  """
  probe = directory / f".jaxkd-write-probe-{jax.process_index()}-{os.getpid()}"
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b"probe")
    probe.unlink()
  except OSError as error:
    raise CheckpointDirectoryError(
      f"cannot write checkpoints to {directory} ({type(error).__name__}: {error}). Make that directory (and its "
      "parents) writable by this user, or pass a workdir on a writable filesystem; to only read a checkpoint's "
      "variables use jaxkd.training.checkpoint.load_variables, which writes nothing."
    ) from error


_barrier_ids = itertools.count()


def _sync_processes(what: str) -> None:
  """A barrier over all processes (a no-op with one); orbax needs a fresh name for each."""
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(f"jaxkd_{what}_{next(_barrier_ids)}")


class Checkpointer:
  """An orbax ``CheckpointManager`` for a student run: keep the last K and the best, resume the latest.

  Args:
    directory: where step directories go (created if missing).
    max_to_keep: how many of the most recent checkpoints to keep.
    best_metric: a metric passed to :meth:`save`; the best checkpoint by it is kept too. None: only the last K.
    best_mode: ``'max'`` or ``'min'``.
    async_save: write in a background thread while training continues.

  Raises:
    CheckpointDirectoryError: naming ``directory`` when it cannot be created or written.
  """

  ITEMS = ("model", "train", "data", "config", "meta", "integrity")

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
    _check_writable(self.directory)
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
    to the next step at once; the write itself runs in the background. The
    SHA-256 of the ``model`` and ``train`` arrays is computed here, on the host
    copy (about a second per GB of state).
    """
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      return False
    model, train = _split_state(state)
    integrity = {
      "version": _INTEGRITY_VERSION,
      "algorithm": "sha256",
      "model": _integrity_digest(model),
      "train": _integrity_digest(train),
    }
    args = ocp.args.Composite(
      model=ocp.args.StandardSave(model),
      train=ocp.args.StandardSave(train),
      data=ocp.args.JsonSave(data_state if data_state is not None else {}),
      config=ocp.args.JsonSave(_jsonable(config) if config is not None else {}),
      meta=ocp.args.JsonSave(_jsonable(meta) if meta is not None else {}),
      integrity=ocp.args.JsonSave(integrity),
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

  def restore(
    self, state_template: Any, step: int | None = None, *, accept: Callable[[Restored], None] | None = None
  ) -> Restored | None:
    """Restores the latest complete checkpoint (or ``step``) into the structure of ``state_template``.

    None when the directory has no checkpoint. One that fails to read (files damaged after it was finalised),
    fails the integrity check, or that ``accept(restored)`` rejects with a :class:`CheckpointIntegrityError`
    (fit's check of the iterator position; other errors propagate) is skipped for the previous one, with a warning;
    once an older one is read, the skipped ones move into ``damaged/`` so that their steps can be saved again. One
    whose shapes differ from ``state_template`` raises :class:`CheckpointMismatchError`: it holds another model.

    Raises:
      CheckpointMismatchError: the checkpoint holds another model.
      CheckpointIntegrityError: ``step``, or every checkpoint, failed the integrity check (nothing is moved).
      RuntimeError: ``step``, or every checkpoint, could not be read (nothing is moved).
    """
    for name in self.incomplete_steps():
      log.warning("ignoring incomplete checkpoint %s (a save was interrupted)", self.directory / name)
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    failures: list[tuple[int, str, Exception]] = []
    for candidate in steps:
      try:
        metadata = self._manager.item_metadata(candidate)
        if metadata["model"] is None or metadata["train"] is None:
          raise FileNotFoundError("its model or train item is missing")
      except Exception as error:  # noqa: BLE001 - unreadable metadata: treat like an unreadable checkpoint
        failure = error
      else:
        # Outside the try: a model mismatch must stop the run, not fall back to an older checkpoint.
        self.check_compatible(state_template, candidate, metadata)
        try:
          restored = self._restore_step(state_template, candidate, metadata)
        except Exception as error:  # noqa: BLE001 - any read failure means: try the previous checkpoint
          failure = error
        else:
          failure = _rejection(accept, restored)
          if failure is None:
            self._set_aside([failed for failed, _, _ in failures])
            return restored
      message = (
        f"checkpoint step {candidate} in {self.directory} could not be read ({type(failure).__name__}: {failure})"
      )
      if step is not None:
        raise _read_error(failure)(message) from failure
      log.warning("%s; falling back to the previous checkpoint", message)
      print(f"jaxkd: {message}; falling back to the previous checkpoint", flush=True)
      failures.append((candidate, message, failure))
    if failures:
      # Nothing is moved: when every checkpoint fails the cause is more likely the reader (a version, a
      # filesystem) than the files, and moving them all would make the next run start from scratch.
      error_type = _read_error(*(failure for _, _, failure in failures))
      raise error_type(
        "no checkpoint could be read: " + "; ".join(message for _, message, _ in failures) + ". "
        f"If the files are damaged, move the step directories out of {self.directory} (or use a new workdir) to "
        "start afresh; otherwise fix the cause above and rerun."
      ) from failures[0][2]
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves the step directories of ``steps`` into ``damaged/``: orbax no longer sees them, so saves of those
    steps succeed, and their files stay there for inspection."""
    if not steps:
      return
    _sync_processes("set_aside_begin")  # every process is done reading them
    error = None
    if jax.process_index() == 0:
      stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S.%f")
      for step in steps:
        source, target = self.directory / str(step), self.directory / DAMAGED_DIR / f"{step}-{stamp}"
        try:
          target.parent.mkdir(exist_ok=True)
          source.rename(target)
        except OSError as cause:
          error = CheckpointDirectoryError(
            f"checkpoint {source} could not be read and could not be moved aside to {target} ({cause}); as long "
            "as it stays, the retrained step cannot be saved. Move or delete it by hand, then rerun."
          )
          break
        log.warning("moved the unreadable checkpoint %s aside to %s; that step will be saved again", source, target)
        print(f"jaxkd: moved the unreadable checkpoint {source} aside to {target}", flush=True)
    _sync_processes("set_aside_end")  # raised after the barrier, so that the other processes do not wait on it
    if error is not None:
      raise error
    self._manager.reload()

  def _restore_step(self, state_template: Any, step: int, metadata: Any) -> Restored:
    model_template, train_template = _split_state(state_template)
    step_dir = self.directory / str(step)
    items = {
      "model": ocp.args.StandardRestore(_as_saved(model_template, metadata["model"])),
      "train": ocp.args.StandardRestore(_as_saved(train_template, metadata["train"])),
      "data": ocp.args.JsonRestore(),
      "config": ocp.args.JsonRestore(),
      "meta": ocp.args.JsonRestore(),
    }
    if (step_dir / "integrity").is_dir():  # older checkpoints lack it, and orbax refuses a missing item
      items["integrity"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    model, train = restored["model"], restored["train"]
    _check_integrity(step_dir, {"model": model, "train": train}, restored.get("integrity"))
    model, train = _cast_like(model, model_template), _cast_like(train, train_template)
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


def _as_saved(template: PyTree, saved: Any) -> PyTree:
  """``template`` with each array in the dtype the checkpoint holds it in.

  The integrity digest is of the arrays as saved, so they are read as saved and cast to the template's dtypes
  (as orbax would have) only after the check; a model now in bfloat16 is not a damaged checkpoint.
  """
  return _with_dtypes(template, _dtypes(getattr(saved, "tree", saved)), lambda x, dtype: np.empty(x.shape, dtype))


def _cast_like(restored: PyTree, template: PyTree) -> PyTree:
  return _with_dtypes(restored, _dtypes(template), lambda x, dtype: np.asarray(x).astype(dtype))


def _dtypes(tree: PyTree) -> dict[str, Any]:
  """Each array's dtype by its path name (arrays, or orbax's metadata of them)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "dtype"))[0]
  return {_path_name(path): leaf.dtype for path, leaf in leaves}


def _with_dtypes(tree: PyTree, dtypes: Mapping[str, Any], convert: Callable[[Any, Any], Any]) -> PyTree:
  def leaf(path: tuple, x: Any) -> Any:
    dtype = dtypes.get(_path_name(path), x.dtype)
    return x if x.dtype == dtype else convert(x, dtype)

  return jax.tree_util.tree_map_with_path(leaf, tree)


def _rejection(accept: Callable[[Restored], None] | None, restored: Restored) -> CheckpointIntegrityError | None:
  """The damage ``accept`` finds in a checkpoint that was read, or None; its other errors propagate."""
  try:
    if accept is not None:
      accept(restored)
  except CheckpointIntegrityError as error:
    return error
  return None


def _read_error(*failures: Exception) -> type[Exception]:
  """CheckpointIntegrityError when every failure was one (a caller may catch it as a ValueError), else RuntimeError."""
  if failures and all(isinstance(failure, CheckpointIntegrityError) for failure in failures):
    return CheckpointIntegrityError
  return RuntimeError


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


def stored_json(value: Any) -> Any:
  """``value`` (a dict, an ``ml_collections.ConfigDict``, ...) as a checkpoint's ``config`` or ``meta`` item gives it
  back: JSON (tuples as lists, keys as strings, other objects as their ``repr``)."""
  return json.loads(json.dumps(_jsonable(value)))


def _latest_first(manager: ocp.CheckpointManager, path: pathlib.Path, step: int | None) -> list[int]:
  """The steps :func:`load_variables` may read, in order; raises FileNotFoundError when there is none."""
  found = sorted(manager.all_steps(), reverse=True)
  if (step is None and found) or step in found:
    return found if step is None else [step]
  raise FileNotFoundError(
    f"no complete checkpoint{'' if step is None else f' for step {step}'} in {path} (steps found: {found[::-1]})"
  )


def _read_model(manager: ocp.CheckpointManager, path: pathlib.Path, step: int) -> dict:
  """The ``model`` item of ``step``, checked against its integrity record when it has one."""
  step_dir = path / str(step)
  items = {"model": ocp.args.StandardRestore()}
  if (step_dir / "integrity").is_dir():  # absent from checkpoints saved before jaxkd recorded digests
    items["integrity"] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  _check_integrity(step_dir, {"model": restored["model"]}, restored.get("integrity"))
  return restored["model"]


def load_variables(path: os.PathLike | str, *, step: int | None = None) -> tuple[dict, dict]:
  """Reads only ``{'params', 'batch_stats'}`` of a jaxkd checkpoint (a teacher, or a student for inference).

  Reading the latest step, a step that cannot be read or fails its integrity check is skipped for the previous one,
  with a warning (nothing on disk is changed: a fit in that workdir moves damaged steps aside and saves them again).

  Args:
    path: a run's checkpoint directory (the latest readable step is taken) or one step's (``.../checkpoints/1200``).
    step: a step to read from a checkpoint directory.

  Returns:
    ``(variables, info)``, ``info`` with ``path``, ``step`` (the step read) and ``fingerprint`` (of the variables).

  Raises:
    FileNotFoundError: naming the path when it holds no complete checkpoint.
    CheckpointIntegrityError: the step asked for, or every step, failed its integrity check.
    RuntimeError: the step asked for, or every step, could not be read.
  """
  path = pathlib.Path(path).expanduser().absolute()
  if step is None and path.name.isdigit() and (path / "model").is_dir():
    path, step = path.parent, int(path.name)
  if not path.is_dir():
    raise FileNotFoundError(f"no checkpoint directory at {path}")
  manager = ocp.CheckpointManager(
    path, item_names=Checkpointer.ITEMS, options=ocp.CheckpointManagerOptions(read_only=True)
  )
  failures: list[Exception] = []
  try:
    for candidate in _latest_first(manager, path, step):
      try:
        model = _read_model(manager, path, candidate)
        break
      except Exception as error:  # noqa: BLE001 - any read failure means: try the previous checkpoint
        message = f"checkpoint {path / str(candidate)} could not be read ({type(error).__name__}: {error})"
        if step is not None:
          raise _read_error(error)(
            f"{message}. Read another step, or rerun the training in that workdir to save this step again."
          ) from error
        log.warning("%s; reading the previous checkpoint instead", message)
        failures.append(error)
    else:
      raise _read_error(*failures)(
        f"no checkpoint in {path} could be read ({'; '.join(f'{type(e).__name__}: {e}' for e in failures)}). "
        "Rerun the training in that workdir (it moves damaged steps aside and saves again), or use another one."
      ) from failures[0]
  finally:
    manager.close()
  variables = {"params": model["params"], "batch_stats": model.get("batch_stats", {}) or {}}
  return variables, {
    "path": str(path),
    "step": int(candidate),
    "fingerprint": tree_fingerprint(variables)[:FINGERPRINT_DIGITS],
  }
