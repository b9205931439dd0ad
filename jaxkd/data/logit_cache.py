"""Teacher-logit cache: run the teacher once over an unaugmented transfer set and reuse its logits.

With a fixed (unaugmented) transfer set the teacher's outputs never change, so
distillation need not pay a teacher forward pass per step: compute them once, batched
and jitted over all local devices, and keep them on disk under a key that changes
whenever anything that could change them changes:

* the teacher: a hash of every variable's path, dtype, shape and bytes, plus a
  :func:`describe_apply_fn` of ``apply_fn``: a bound Flax ``module.apply`` by its
  module's fields (its hyperparameters), a plain function (a lambda too) by its name,
  code, defaults and closure, so two functions never share an entry. A callable with
  no stable description (an object whose repr is its address) is refused with a
  message saying how to name it (``apply_description=``);
* the data: dataset name, split, filters, and a hash of the image bytes themselves,
  so a re-prepared or edited dataset under the same name is not mistaken for the old;
* the preprocessing: ``mean``/``std`` of :func:`jaxkd.data.normalize`;
* anything else the caller names in ``key_parts``.

A stale cache is therefore never read: a changed input gives a new file name. Each
file (``teacher_logits_<key>.npz``) holds the logits and a SHA-256 checksum of them.
Files are written to a temporary name and renamed, so a crash or several processes
writing at once never leave a partial file under the final name. A damaged file
(unreadable, a checksum that does not match, or a NaN or inf anywhere) is never used:
it is recomputed and rewritten, with a warning naming it, since the cache holds
nothing that cannot be recomputed. Logits that are non-finite when computed are an
error (the teacher is at fault, and recomputing would not help), and are not cached.

Usage::

  logits = cached_teacher_logits(
    functools.partial(teacher.apply, train=False), teacher_variables, transfer,
    cache_dir=workdir / "teacher_logits", mean=mean, std=std)
  batches = BatchIterator(transfer, batch_size=128, train=True, mean=mean, std=std, teacher_logits=logits)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
import re
import types
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.artifacts import array_sha256, json_digest, tree_fingerprint, write_atomically, write_json
from jaxkd.data.batches import normalize
from jaxkd.data.datasets import ArrayDataset

__all__ = [
  "cache_key",
  "cached_teacher_logits",
  "compute_teacher_logits",
  "describe",
  "describe_apply_fn",
]

_log = logging.getLogger(__name__)


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# Flax sets these two fields as a module is bound; neither changes what the module computes.
_FLAX_BOOKKEEPING = ("parent", "name")


class _Unstable(ValueError):
  """A value with no description that is the same across runs and differs between values that act differently."""

  def __init__(self, where: str, value: Any):
    self.where, self.value = where, value
    super().__init__(f"{where} is a {type(value).__qualname__} object with no stable description")


def describe(value: Any) -> str:
  """A description of ``value`` that is the same in every run and differs when ``value`` would act differently.

  Numbers and strings are their repr, arrays their dtype, shape and a hash of their bytes, containers and
  dataclasses (Flax modules included) their described contents, functions their qualified name, a hash of their
  code, their defaults, the contents of their closure and the data globals they read; ``functools.partial`` and
  bound methods their function and arguments or owner; other objects their repr when it holds no memory address.

  Raises:
    ValueError: some part of ``value`` is an object whose repr is only its address (or holds one), so that two
      different values could not be told apart. The message names the part.
  """
  return _describe(value, "value", frozenset())


def _describe(value: Any, where: str, seen: frozenset[int]) -> str:
  if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
    return repr(value)
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return _describe_array(value)
  if isinstance(value, np.dtype):
    return f"dtype({value.str})"
  if isinstance(value, types.ModuleType):
    return f"module {value.__name__}"
  if isinstance(value, type):
    return f"class {value.__module__}.{value.__qualname__}"
  if id(value) in seen:  # A cycle (a recursive function, a self-referencing container): named, not followed.
    return f"<cycle {type(value).__qualname__}>"
  seen = seen | {id(value)}
  if isinstance(value, (list, tuple)):
    items = ", ".join(_describe(v, f"{where}[{i}]", seen) for i, v in enumerate(value))
    return f"{type(value).__qualname__}[{items}]"
  if isinstance(value, (set, frozenset)):
    return f"{type(value).__qualname__}{{{', '.join(sorted(_describe(v, where, seen) for v in value))}}}"
  if isinstance(value, Mapping):
    items = sorted(f"{_describe(k, where, seen)}: {_describe(v, f'{where}[{k!r}]', seen)}" for k, v in value.items())
    return f"{type(value).__qualname__}{{{', '.join(items)}}}"
  if callable(value) and not dataclasses.is_dataclass(value):
    described = _describe_callable(value, where, seen)
    if described is not None:
      return described
  if dataclasses.is_dataclass(value):
    skip = _FLAX_BOOKKEEPING if isinstance(value, nn.Module) else ()
    fields = [f.name for f in dataclasses.fields(value) if f.name not in skip]
    items = ", ".join(f"{name}={_describe(getattr(value, name), f'{where}.{name}', seen)}" for name in fields)
    return f"{type(value).__module__}.{type(value).__qualname__}({items})"
  if type(value).__repr__ is not object.__repr__:
    text = repr(value)
    if not _ADDRESS.search(text):
      return text
  raise _Unstable(where, value)


def _describe_array(value: Any) -> str:
  if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
    value = jax.random.key_data(value)
  array = np.asarray(value)
  digest = hashlib.blake2b(array.tobytes(), digest_size=16)
  return f"array{tuple(array.shape)}:{array.dtype.str}:{digest.hexdigest()}"


def _describe_callable(fn: Any, where: str, seen: frozenset[int]) -> str | None:
  """Functions, partials, bound methods and wrappers; None for other callables (described as objects)."""
  if isinstance(fn, functools.partial):
    args = ", ".join(_describe(a, f"{where} argument {i}", seen) for i, a in enumerate(fn.args))
    kwargs = ", ".join(f"{k}={_describe(v, f'{where} argument {k!r}', seen)}" for k, v in sorted(fn.keywords.items()))
    return f"partial({_describe(fn.func, where, seen)}; {args}; {kwargs})"
  if isinstance(fn, types.MethodType):
    # A bound Flax `module.apply` is its module's fields: the variables are passed, the module holds the rest.
    return f"{_name(fn.__func__)} of {_describe(fn.__self__, f'{where}.__self__', seen)}"
  if isinstance(fn, types.FunctionType):
    return _describe_function(fn, where, seen)
  if isinstance(fn, types.BuiltinFunctionType):
    owner = fn.__self__
    if owner is None or isinstance(owner, types.ModuleType):
      return _name(fn)
    return f"{_name(fn)} of {_describe(owner, f'{where}.__self__', seen)}"
  wrapped = getattr(fn, "__wrapped__", None)  # jax.jit and other wrappers keep the function they wrap here.
  if wrapped is not None:
    return f"{type(fn).__qualname__}({_describe(wrapped, where, seen)})"
  return None


def _name(fn: Any) -> str:
  return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _describe_function(fn: types.FunctionType, where: str, seen: frozenset[int]) -> str:
  """Name, code, defaults, closure and data globals: two lambdas (one qualified name) still differ."""
  code = fn.__code__
  parts = [_name(fn), f"code {_code_digest(code, seen)}"]
  if fn.__defaults__:
    parts.append(f"defaults {_describe(fn.__defaults__, f'{where} defaults', seen)}")
  if fn.__kwdefaults__:
    parts.append(f"keyword defaults {_describe(fn.__kwdefaults__, f'{where} defaults', seen)}")
  for name, cell in zip(code.co_freevars, fn.__closure__ or (), strict=True):
    try:
      contents = cell.cell_contents
    except ValueError:  # A closure variable not assigned yet.
      contents = "<empty>"
    parts.append(f"{name}={_describe(contents, f'{where} closure variable {name!r}', seen)}")
  for name in sorted(_global_names(code)):
    value = fn.__globals__.get(name, _MISSING)
    if value is _MISSING or _is_named_code(value):
      continue  # Modules, classes and functions are named by the code; only data globals are read here.
    try:
      parts.append(f"global {name}={_describe(value, f'{where} global {name!r}', seen)}")
    except _Unstable:
      continue  # Best effort: the function's own closure and arguments are what must be described.
  return f"function({'; '.join(parts)})"


_MISSING = object()


def _is_named_code(value: Any) -> bool:
  if isinstance(value, (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
    return True
  return isinstance(value, functools.partial) or hasattr(value, "__wrapped__")


def _global_names(code: types.CodeType) -> set[str]:
  names = set(code.co_names)
  for const in code.co_consts:
    if isinstance(const, types.CodeType):
      names |= _global_names(const)
  return names


def _code_digest(code: types.CodeType, seen: frozenset[int]) -> str:
  """Bytecode, names and constants (nested functions' code included): stable across runs of one Python version."""
  digest = hashlib.blake2b(digest_size=16)

  def add(code: types.CodeType) -> None:
    digest.update(code.co_code)
    digest.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    for const in code.co_consts:
      if isinstance(const, types.CodeType):
        add(const)
      else:
        digest.update(_describe(const, "constant", seen).encode())

  add(code)
  return digest.hexdigest()


def describe_apply_fn(apply_fn: Callable[..., Any]) -> str:
  """:func:`describe` of the teacher's forward function, for cache keys.

  Raises:
    ValueError: ``apply_fn`` (or something it holds) has no stable description, so two different teachers could
      share cache entries; the message says how to give it one (``apply_description=``, or a ``__repr__``).
  """
  try:
    return _describe(apply_fn, "apply_fn", frozenset())
  except _Unstable as e:
    kind = f"{type(e.value).__module__}.{type(e.value).__qualname__}"
    raise ValueError(
      f"cannot key the teacher-logit cache on apply_fn={apply_fn!r}: {e.where} is a {kind} object whose repr "
      f"{_ADDRESS.sub(' at 0x...', repr(e.value))!r} names only its memory address, so two different teachers "
      f"could share one cache entry. Pass apply_description='...' (a string naming everything that sets the "
      f"teacher's outputs besides its variables) to cached_teacher_logits, or give {kind} a __repr__ (or make it "
      "a dataclass) that shows its settings."
    ) from None


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
  apply_description: str | None = None,
) -> tuple[str, dict[str, Any]]:
  """The cache file key of :func:`cached_teacher_logits` and the description it hashes.

  Returns:
    ``(key, description)``: a 32-hex-digit key and the JSON-able dict it is the hash of.

  Raises:
    ValueError: ``apply_fn`` has no stable description and no ``apply_description`` was given
      (:func:`describe_apply_fn`).
  """
  if apply_description is not None and not (isinstance(apply_description, str) and apply_description):
    raise ValueError(f"apply_description must be a non-empty string, got {apply_description!r}.")
  description = {
    "format": 2,
    "teacher": {
      "variables_sha256": tree_fingerprint(variables),
      "apply_fn": describe_apply_fn(apply_fn) if apply_description is None else f"given: {apply_description}",
    },
    "data": _dataset_description(data),
    "preprocessing": {"normalize": {"mean": _stats(mean), "std": _stats(std)}},
    "key_parts": dict(key_parts or {}),
  }
  # json's default spacing, as keys had before jaxkd.artifacts: existing cache files keep their names.
  return json_digest(description, default=repr, separators=None)[:32], description


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


def _checksum(logits: np.ndarray) -> str:
  return array_sha256(logits, layout=True)


def _non_finite_rows(logits: np.ndarray) -> np.ndarray:
  return np.flatnonzero(~np.isfinite(logits).all(axis=-1))


def _read_cache(path: str, num_examples: int) -> np.ndarray | None:
  """The logits stored at ``path``; None, with a warning naming the file and the fault, when it cannot be trusted."""
  try:
    with np.load(path, allow_pickle=False) as stored:
      logits, recorded = stored["logits"], str(stored["sha256"])
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
    _log.warning("Teacher-logit cache %s is unreadable (%s: %s); recomputing it.", path, type(e).__name__, e)
    return None
  if logits.ndim != 2 or len(logits) != num_examples or logits.dtype != np.float32:
    _log.warning(
      "Teacher-logit cache %s holds %s%s, not float32 [%d, num_classes]; recomputing it.",
      path,
      logits.dtype,
      logits.shape,
      num_examples,
    )
    return None
  if _checksum(logits) != recorded:
    _log.warning(
      "Teacher-logit cache %s fails its checksum (the logits were changed or damaged after they were written); "
      "recomputing it.",
      path,
    )
    return None
  bad = _non_finite_rows(logits)
  if len(bad):
    _log.warning(
      "Teacher-logit cache %s holds non-finite logits for %d examples (first: %s); recomputing it.",
      path,
      len(bad),
      bad[:5].tolist(),
    )
    return None
  return logits


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
  apply_description: str | None = None,
) -> np.ndarray:
  """The teacher's logits over ``data``, from ``cache_dir`` when a matching entry exists.

  Each process computes on its local devices and writes the same file; the atomic
  rename makes concurrent writers safe. Pass the result to
  ``jaxkd.data.BatchIterator(teacher_logits=...)`` with the same ``data``, ``mean``
  and ``std``: rows are aligned with ``data``, so the iterator's shuffling carries them
  along. A cache file that is unreadable, fails its checksum or holds a non-finite
  value is recomputed, with a warning naming it.

  Args:
    apply_fn: ``apply_fn(variables, images) -> logits`` in inference mode.
    variables: the teacher's variables.
    data: the transfer set (an :class:`~jaxkd.data.datasets.ArrayDataset`, after any
      :func:`jaxkd.data.transfer_set` filtering) or uint8 images
      ``[num_examples, height, width, channels]``.
    cache_dir: directory for the cache files (created if missing).
    mean: normalisation mean, as given to the pipeline.
    std: normalisation standard deviation, as given to the pipeline.
    batch_size: examples per forward pass.
    key_parts: further JSON-able facts that change the teacher's outputs and that the
      variables and ``apply_fn`` do not show (e.g. a dtype policy set elsewhere).
    apply_description: a string naming everything besides ``variables`` that sets the
      teacher's outputs, used in the key instead of :func:`describe_apply_fn`; for an
      ``apply_fn`` that cannot be described (a callable object whose repr is only its
      address). Two different functions given the same string share cache entries.

  Returns:
    float32 ``[num_examples, num_classes]``, row ``i`` for example ``i`` of ``data``.

  Raises:
    ValueError: ``images`` are not uint8 ``[num_examples, height, width, channels]``;
      ``apply_fn`` cannot be described and no ``apply_description`` was given; or the
      teacher's own logits are non-finite (nothing is cached then).
  """
  images = data.images if isinstance(data, ArrayDataset) else np.asarray(data)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 [num_examples, height, width, channels], got {images.dtype}{images.shape}.")
  key, description = cache_key(
    apply_fn, variables, data, mean=mean, std=std, key_parts=key_parts, apply_description=apply_description
  )
  cache_dir = os.fspath(cache_dir)
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, f"teacher_logits_{key}.npz")
  if os.path.exists(path):
    logits = _read_cache(path, len(images))
    if logits is not None:
      _log.info("Teacher logits: reusing %s.", path)
      return logits
  _log.info("Teacher logits: computing %d examples into %s.", len(images), path)
  logits = compute_teacher_logits(apply_fn, variables, images, mean=mean, std=std, batch_size=batch_size)
  bad = _non_finite_rows(logits)
  if len(bad):
    raise ValueError(
      f"the teacher's logits are non-finite (NaN or inf) for {len(bad)} of {len(logits)} examples (first: "
      f"{bad[:5].tolist()}), so nothing was cached in {cache_dir}. Check the teacher's variables (a diverged "
      "checkpoint?) and apply_fn before distilling from them."
    )
  # The description goes first and is only informational; the .npz (logits and their checksum) is what counts.
  write_json(path[: -len(".npz")] + ".json", description, default=repr)
  write_atomically(path, lambda f: np.savez(f, logits=logits, sha256=np.array(_checksum(logits))))
  return logits
