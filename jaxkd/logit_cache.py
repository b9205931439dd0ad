"""Teacher-logit cache: run the teacher once over an unaugmented transfer set and reuse its logits.

With a fixed (unaugmented) transfer set the teacher's outputs never change, so
distillation need not pay a teacher forward pass per step: compute them once, batched
and jitted over all local devices, and keep them on disk under a key that changes
whenever anything that could change them changes:

* the teacher: a hash of every variable's path, dtype, shape and bytes, plus a
  description of ``apply_fn`` (a Flax module's repr carries its hyperparameters);
* the data: dataset name, split, filters, and a hash of the image bytes themselves,
  so a re-prepared or edited dataset under the same name is not mistaken for the old;
* the preprocessing: ``mean``/``std`` of :func:`jaxkd.data.normalize`;
* anything else the caller names in ``key_parts``.

A stale cache is therefore never read: a changed input gives a new file name. Files
are written to a temporary name and renamed, so a crash or several processes writing
at once never leave a partial file under the final name, and an unreadable file is
recomputed rather than trusted.

Usage::

  logits = cached_teacher_logits(
    functools.partial(teacher.apply, train=False), teacher_variables, transfer,
    cache_dir=workdir / "teacher_logits", mean=mean, std=std)
  batches = BatchIterator(transfer, batch_size=128, train=True, mean=mean, std=std, teacher_logits=logits)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.data import normalize
from jaxkd.datasets import ArrayDataset
from jaxkd.utils import tree_fingerprint

__all__ = [
  "cache_key",
  "cached_teacher_logits",
  "compute_teacher_logits",
  "describe_apply_fn",
  "variables_fingerprint",
]

_log = logging.getLogger(__name__)


def variables_fingerprint(variables: Any) -> str:
  """Hex SHA-256 of the teacher's variables (:func:`jaxkd.utils.tree_fingerprint`)."""
  return tree_fingerprint(variables)


def _brief_repr(value: Any) -> str:
  if isinstance(value, (bool, int, float, str, type(None))):
    return repr(value)
  if isinstance(value, (np.ndarray, jax.Array)):
    return f"array{tuple(value.shape)}:{value.dtype}"
  return type(value).__qualname__


def describe_apply_fn(apply_fn: Callable[..., Any]) -> str:
  """A stable description of the teacher's forward function for cache keys.

  A bound Flax ``module.apply`` is described by the module's repr (its class and
  hyperparameters); ``functools.partial`` by its function and simple arguments;
  anything else by its module and qualified name.
  """
  if isinstance(apply_fn, functools.partial):
    args = ", ".join(_brief_repr(a) for a in apply_fn.args)
    kwargs = ", ".join(f"{k}={_brief_repr(v)}" for k, v in sorted(apply_fn.keywords.items()))
    return f"partial({describe_apply_fn(apply_fn.func)}; {args}; {kwargs})"
  owner = getattr(apply_fn, "__self__", None)
  name = f"{getattr(apply_fn, '__module__', '')}.{getattr(apply_fn, '__qualname__', type(apply_fn).__qualname__)}"
  if owner is not None:
    return f"{name} of {owner!r}"
  return name


def _dataset_description(data: ArrayDataset | np.ndarray) -> dict[str, Any]:
  images = data.images if isinstance(data, ArrayDataset) else data
  digest = hashlib.blake2b(digest_size=16)
  digest.update(np.ascontiguousarray(images).data)
  description = {"images": f"{images.dtype.str}{tuple(images.shape)}", "images_blake2b": digest.hexdigest()}
  if isinstance(data, ArrayDataset):
    description.update(name=data.name, split=data.split, filters=list(data.filters))
  return description


def _stats(value: float | Sequence[float]) -> list[float]:
  return [float(v) for v in np.asarray(value, dtype=np.float32).reshape(-1)]


def cache_key(
  apply_fn: Callable[..., Any],
  variables: Any,
  data: ArrayDataset | np.ndarray,
  *,
  mean: float | Sequence[float] = 0.0,
  std: float | Sequence[float] = 1.0,
  key_parts: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
  """The cache file key of :func:`cached_teacher_logits` and the description it hashes.

  Returns:
    ``(key, description)``: a 32-hex-digit key and the JSON-able dict it is the hash of.
  """
  description = {
    "format": 1,
    "teacher": {"variables_sha256": variables_fingerprint(variables), "apply_fn": describe_apply_fn(apply_fn)},
    "data": _dataset_description(data),
    "preprocessing": {"normalize": {"mean": _stats(mean), "std": _stats(std)}},
    "key_parts": dict(key_parts or {}),
  }
  encoded = json.dumps(description, sort_keys=True, default=repr).encode()
  return hashlib.sha256(encoded).hexdigest()[:32], description


def compute_teacher_logits(
  apply_fn: Callable[[Any, jax.Array], jax.Array],
  variables: Any,
  images: np.ndarray,
  *,
  mean: float | Sequence[float] = 0.0,
  std: float | Sequence[float] = 1.0,
  batch_size: int = 1024,
) -> np.ndarray:
  """The teacher's logits for every image, batched, jitted and split over all local devices.

  Args:
    apply_fn: ``apply_fn(variables, images) -> logits`` in inference mode, e.g.
      ``functools.partial(model.apply, train=False)``.
    variables: the teacher's variables (params, batch_stats, ...).
    images: uint8 ``[num_examples, height, width, channels]``; normalised with
      :func:`jaxkd.data.normalize` exactly as the pipeline does.
    mean: normalisation mean.
    std: normalisation standard deviation.
    batch_size: examples per forward pass, rounded up to a multiple of the device count.
      The last batch is padded, so the function compiles once.

  Returns:
    float32 ``[num_examples, num_classes]``.
  """
  if len(images) == 0 or batch_size < 1:
    raise ValueError(f"need at least one image and batch_size >= 1, got {len(images)} images, batch_size {batch_size}.")
  devices = jax.local_devices()
  batch_size = math.ceil(min(batch_size, len(images)) / len(devices)) * len(devices)
  mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  variables = jax.device_put(variables, replicated)

  @jax.jit
  def forward(variables, images):
    logits = apply_fn(variables, images)
    if logits.ndim != 2 or logits.shape[0] != images.shape[0]:
      raise ValueError(f"apply_fn must return logits [batch, num_classes], got shape {logits.shape}.")
    return logits.astype(jnp.float32)

  outputs = []
  for start in range(0, len(images), batch_size):
    chunk = normalize(images[start : start + batch_size], mean=mean, std=std)  # [<= batch, H, W, C]
    num_real = len(chunk)
    if num_real < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - num_real, *chunk.shape[1:]), chunk.dtype)])
    # Dispatch is asynchronous: normalising the next chunk overlaps this forward pass.
    outputs.append((forward(variables, jax.device_put(chunk, batch_sharding)), num_real))
  return np.concatenate([np.asarray(logits)[:num_real] for logits, num_real in outputs])


def _write_atomically(path: str, write: Callable[[Any], None]) -> None:
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
  try:
    with open(tmp, "wb") as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def cached_teacher_logits(
  apply_fn: Callable[[Any, jax.Array], jax.Array],
  variables: Any,
  data: ArrayDataset | np.ndarray,
  *,
  cache_dir: str | os.PathLike,
  mean: float | Sequence[float] = 0.0,
  std: float | Sequence[float] = 1.0,
  batch_size: int = 1024,
  key_parts: Mapping[str, Any] | None = None,
) -> np.ndarray:
  """The teacher's logits over ``data``, from ``cache_dir`` when a matching entry exists.

  Each process computes on its local devices and writes the same file; the atomic
  rename makes concurrent writers safe. Pass the result to
  ``jaxkd.data.BatchIterator(teacher_logits=...)`` with the same ``data``, ``mean``
  and ``std``: rows are aligned with ``data``, so the iterator's shuffling carries them
  along.

  Args:
    apply_fn: ``apply_fn(variables, images) -> logits`` in inference mode.
    variables: the teacher's variables.
    data: the transfer set (an :class:`~jaxkd.datasets.ArrayDataset`, after any
      :func:`jaxkd.data.transfer_set` filtering) or uint8 images
      ``[num_examples, height, width, channels]``.
    cache_dir: directory for the cache files (created if missing).
    mean: normalisation mean, as given to the pipeline.
    std: normalisation standard deviation, as given to the pipeline.
    batch_size: examples per forward pass.
    key_parts: further JSON-able facts that change the teacher's outputs and that the
      variables and ``apply_fn`` do not show (e.g. a dtype policy set elsewhere).

  Returns:
    float32 ``[num_examples, num_classes]``, row ``i`` for example ``i`` of ``data``.
  """
  images = data.images if isinstance(data, ArrayDataset) else np.asarray(data)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 [num_examples, height, width, channels], got {images.dtype}{images.shape}.")
  key, description = cache_key(apply_fn, variables, data, mean=mean, std=std, key_parts=key_parts)
  cache_dir = os.fspath(cache_dir)
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, f"teacher_logits_{key}.npy")
  if os.path.exists(path):
    try:
      logits = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
      _log.warning("Teacher-logit cache %s is unreadable (%s); recomputing.", path, e)
    else:
      if logits.ndim == 2 and len(logits) == len(images) and logits.dtype == np.float32:
        _log.info("Teacher logits: reusing %s.", path)
        return logits
      _log.warning("Teacher-logit cache %s holds %s%s; recomputing.", path, logits.dtype, logits.shape)
  _log.info("Teacher logits: computing %d examples into %s.", len(images), path)
  logits = compute_teacher_logits(apply_fn, variables, images, mean=mean, std=std, batch_size=batch_size)
  # The description goes first and is only informational; the .npy is what counts.
  metadata = json.dumps(description, sort_keys=True, indent=2, default=repr).encode()
  _write_atomically(path[: -len(".npy")] + ".json", lambda f: f.write(metadata))
  _write_atomically(path, lambda f: np.save(f, logits, allow_pickle=False))
  return logits
