"""How the step calls a network: any linen or NNX model (or function) that returns logits.

:class:`Model` adapts a network to one calling convention,
``model(variables, batch, train=..., rngs=..., mutable=..., capture=...) -> (logits, features, updates)``:

* **inputs**: which batch entries the network receives, positionally (``inputs=('image',)``, the default) and by
  keyword (``input_kwargs={'attention_mask': 'attention_mask'}``: keyword -> batch key). Token ids, attention masks
  and positions pass through; only floating inputs are cast to ``compute_dtype``, never integers or booleans.
* **the train flag**: ``train=``, ``training=``, ``deterministic=`` (inverted) or none, found from the module's
  ``__call__`` signature (``train_flag='auto'``) or named.
* **outputs**: logits, a tuple or a dict: ``logits=`` names the entry (default: the array itself, the first
  element of a tuple, or ``'logits'`` of a dict).
* **features** for feature-based loss terms: linen layers by module path (``capture_intermediates``), or values the
  model sows into ``'intermediates'``.

:func:`as_model` builds one from a linen module, a bound ``module.apply``, an NNX module (through :func:`from_nnx`),
an apply function or a :class:`Model`. Every mismatch is a ValueError that says how to adapt the model.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["Model", "as_model", "from_nnx", "TRAIN_FLAGS", "cast_floating"]

PyTree = Any
# Flag names recognised by train_flag='auto'; 'deterministic' is True in eval mode.
TRAIN_FLAGS = ("train", "training", "is_training", "deterministic")


def cast_floating(tree: PyTree, dtype: Any) -> PyTree:
  """Casts floating leaves to ``dtype`` (None: unchanged); integer and boolean leaves are never cast."""
  if dtype is None:
    return tree
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree)


def from_nnx(module: nnx.Module) -> tuple[Callable[..., Any], dict[str, Any]]:
  """Adapts a Flax NNX module to the functional ``apply_fn(variables, *inputs, ...)`` convention.

  The module is split once with :func:`flax.nnx.split` into a graph definition, its :class:`~flax.nnx.Param`
  state, its :class:`~flax.nnx.BatchStat` state and the rest (RNG streams and other variables). The returned
  ``apply_fn`` merges them back on every call (inside the compiled step), sets train or eval mode with
  ``model.train()``/``model.eval()`` and, when ``mutable`` is given, returns the updated BatchNorm statistics the
  way linen does. When ``rngs={'dropout': key}`` is passed every RNG stream is reseeded from ``key``, so dropout
  follows the train step's key rather than the module's own counters.

  A trained student goes back into its module with ``nnx.update(module, state.params, state.batch_stats)``.

  Returns:
    ``(apply_fn, variables)`` with ``variables = {'params': ..., 'batch_stats': ...}``: a student
    (:func:`jaxkd.create_train_state` calls this for NNX modules) or a teacher (``teacher=apply_fn``,
    ``teacher_variables=variables``).
  """
  graphdef, params, batch_stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
  stream_tags = sorted({node.tag for _, node in nnx.iter_graph(module) if isinstance(node, nnx.RngStream)})

  def apply_fn(
    variables: Mapping[str, Any],
    *inputs: Any,
    train: bool = False,
    rngs: Mapping[str, jax.Array] | None = None,
    mutable: bool | Sequence[str] = False,
    **kwargs: Any,
  ) -> Any:
    # copy=True: fresh Variables inside the trace; the closed-over ones must not be mutated from inside it.
    model = nnx.merge(graphdef, variables["params"], variables.get("batch_stats", batch_stats), rest, copy=True)
    if train:
      model.train()
    else:
      model.eval()
    if rngs is not None and "dropout" in rngs and stream_tags:
      nnx.reseed(model, **{tag: jax.random.fold_in(rngs["dropout"], i) for i, tag in enumerate(stream_tags)})
    outputs = model(*inputs, **kwargs)
    if not mutable:
      return outputs
    _, _, new_batch_stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return outputs, {"batch_stats": new_batch_stats}

  apply_fn.nnx_module_type = type(module).__name__  # for error messages
  return apply_fn, {"params": params, "batch_stats": batch_stats}


def _train_flag_of(fn: Callable[..., Any]) -> str | None:
  """The train-flag keyword ``fn`` accepts, or None; ``'train'`` for functions taking ``**kwargs``."""
  try:
    parameters = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return "train"
  for name in TRAIN_FLAGS:
    if name in parameters:
      return name
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
    return "train"
  return None


def _accepts_keyword(fn: Callable[..., Any], keyword: str) -> bool:
  try:
    parameters = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return True
  return keyword in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


@dataclasses.dataclass(frozen=True)
class Model:
  """A network as the step calls it.

  Attributes:
    apply_fn: ``apply_fn(variables, *inputs, <train flag>=..., rngs=..., mutable=..., **input_kwargs)``, e.g. a
      linen ``module.apply`` or the first result of :func:`from_nnx`.
    inputs: batch keys passed positionally, in order.
    input_kwargs: ``{keyword: batch key}`` passed by keyword (attention masks, positions).
    train_flag: the keyword that switches train mode, or None when the model has none.
    logits: where the logits are in the output: None (the output itself, the first element of a tuple, or
      ``'logits'`` of a dict), an index into a tuple or a key of a dict.
    linen_module: the linen module behind ``apply_fn`` (needed to capture features by layer path), or None.
    name: ``'student'`` or ``'teacher'`` in error messages.
    takes_rngs: whether ``apply_fn`` accepts ``rngs=`` (the dropout key in train mode).
    head: the output layer kept apart, ``head(variables, hidden) -> logits``, for language models whose
      vocabulary projection dominates memory: ``apply_fn`` then returns the hidden states ``[..., d]`` and the
      step applies the head itself, to all positions at once or chunk by chunk (``make_train_step(chunk_size=)``)
      so that the ``[batch, length, vocab]`` logits never exist whole. :func:`jaxkd.lm.lm_model` builds one.
  """

  apply_fn: Callable[..., Any]
  inputs: tuple[str, ...] = ("image",)
  input_kwargs: Mapping[str, str] = dataclasses.field(default_factory=dict)
  train_flag: str | None = "train"
  logits: int | str | None = None
  linen_module: nn.Module | None = None
  name: str = "model"
  takes_rngs: bool = True
  head: Callable[[PyTree, jax.Array], jax.Array] | None = None

  def __post_init__(self):
    inputs = (self.inputs,) if isinstance(self.inputs, str) else tuple(self.inputs)
    object.__setattr__(self, "inputs", inputs)
    object.__setattr__(self, "input_kwargs", dict(self.input_kwargs))
    if not inputs and not self.input_kwargs:
      raise ValueError(f"{self.name}: a model needs at least one input (inputs=('image',) or input_kwargs).")
    if self.train_flag is not None and self.train_flag not in TRAIN_FLAGS:
      raise ValueError(f"{self.name}: train_flag must be one of {TRAIN_FLAGS} or None, got {self.train_flag!r}.")

  def __hash__(self) -> int:  # input_kwargs is a dict; equal adapters of the same apply_fn hash alike
    try:
      fn_hash = hash(self.apply_fn)
    except TypeError:  # the bound apply of an unhashable module (a list-valued attribute)
      fn_hash = id(self.apply_fn)
    key = (fn_hash, self.inputs, tuple(sorted(self.input_kwargs.items())), self.train_flag, self.logits, self.head)
    return hash(key)

  @property
  def batch_keys(self) -> tuple[str, ...]:
    """Every batch entry the model reads."""
    return (*self.inputs, *self.input_kwargs.values())

  def check_batch(self, batch: Mapping[str, Any]) -> None:
    """Raises ValueError naming the missing entries and the model's ``inputs``."""
    missing = [key for key in self.batch_keys if key not in batch]
    if missing:
      raise ValueError(
        f"the {self.name} reads batch entries {list(self.batch_keys)} but the batch has no {missing} (it has "
        f"{sorted(batch)}); say which entries the model takes with inputs=(...) / input_kwargs={{...}}."
      )

  def flag_kwargs(self, train: bool) -> dict[str, bool]:
    """The train-flag keyword for train or eval mode ({} for a model without one)."""
    if self.train_flag is None:
      return {}
    return {self.train_flag: (not train) if self.train_flag == "deterministic" else train}

  def _select_logits(self, outputs: Any) -> jax.Array:
    if self.logits is None:
      if isinstance(outputs, tuple | list):
        outputs = outputs[0]
      elif isinstance(outputs, Mapping):
        if "logits" not in outputs:
          raise ValueError(
            f"the {self.name} returns a dict with keys {sorted(outputs)}, none named 'logits': say which holds "
            "the logits with logits='<key>'."
          )
        outputs = outputs["logits"]
    else:
      try:
        outputs = outputs[self.logits]
      except (KeyError, IndexError, TypeError):
        what = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
        raise ValueError(
          f"the {self.name}'s output has no entry {self.logits!r} (logits=...): it has {what}."
        ) from None
    if not hasattr(outputs, "shape") or not hasattr(outputs, "dtype"):
      raise ValueError(
        f"the {self.name}'s logits are a {type(outputs).__name__}, not an array: say where the logits are with "
        "logits=<index or key>."
      )
    return outputs

  def __call__(
    self,
    variables: PyTree,
    batch: Mapping[str, Any],
    *,
    train: bool,
    rngs: Mapping[str, jax.Array] | None = None,
    mutable: Sequence[str] = (),
    capture: Sequence[str] = (),
    compute_dtype: Any = None,
    project: bool = True,
  ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]:
    """Runs the network on ``batch``: ``(logits, {layer: features}, {collection: updates})``.

    With a ``head`` and ``project=False`` the first result is the hidden states the head takes.
    """
    args = [cast_floating(batch[key], compute_dtype) for key in self.inputs]
    kwargs = {name: cast_floating(batch[key], compute_dtype) for name, key in self.input_kwargs.items()}
    kwargs.update(self.flag_kwargs(train))
    if rngs is not None and self.takes_rngs:
      kwargs["rngs"] = rngs
    collections = list(mutable)
    if capture:
      if self.linen_module is None:
        raise ValueError(
          f"feature terms read layers {list(capture)} of the {self.name}, which needs a linen module (features "
          "are captured with capture_intermediates); NNX models and plain functions support logit terms only."
        )
      collections.append("intermediates")
      kwargs["capture_intermediates"] = _capture_filter(capture)
    if collections:
      outputs, updates = self.apply_fn(variables, *args, mutable=collections, **kwargs)
      updates = dict(updates)
    else:
      outputs, updates = self.apply_fn(variables, *args, **kwargs), {}
    features = {}
    if capture:
      intermediates = updates.pop("intermediates", {})
      for layer in capture:
        try:
          features[layer] = _lookup(intermediates, layer)
        except KeyError:
          raise ValueError(
            f"no {self.name} layer {layer!r}; the {self.name}'s layers are "
            f"{self.layer_names(variables, batch)} (module paths whose __call__ output is taken, or values sown "
            "into 'intermediates')."
          ) from None
    outputs = self._select_logits(outputs)
    if self.head is not None and project:
      outputs = self.head(variables, outputs)
    return outputs, features, updates

  def layer_names(self, variables: PyTree, batch: Mapping[str, Any]) -> list[str]:
    """Every capturable layer path, from an abstract (shapes-only) run that captures them all."""
    structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), (variables, dict(batch)))

    def run(v: PyTree, b: Mapping[str, Any]) -> Any:
      args = [b[key] for key in self.inputs]
      kwargs = {name: b[key] for name, key in self.input_kwargs.items()}
      kwargs.update(self.flag_kwargs(False))
      return self.apply_fn(v, *args, mutable=["intermediates"], capture_intermediates=True, **kwargs)[1]

    return _available(dict(jax.eval_shape(run, *structs)).get("intermediates", {}))


def as_model(
  model: Any,
  *,
  inputs: str | Sequence[str] = ("image",),
  input_kwargs: Mapping[str, str] | None = None,
  train_flag: str | None = "auto",
  logits: int | str | None = None,
  name: str = "model",
) -> Model:
  """A :class:`Model` from a linen module, a bound ``module.apply``, an apply function or a :class:`Model`.

  ``train_flag='auto'`` reads the flag from the linen module's ``__call__`` signature (or the function's): the
  first of ``train``, ``training``, ``is_training``, ``deterministic`` it accepts, else none; a function that
  takes ``**kwargs`` is given ``train=``. A :class:`Model` is returned as it is (its own settings stand).

  Raises:
    ValueError: for an NNX module passed where its variables cannot travel with it (use :func:`from_nnx`).
  """
  if isinstance(model, Model):
    return model
  if isinstance(model, nnx.Module):
    raise ValueError(
      f"the {name} is an NNX module ({type(model).__name__}); pass its functional form: "
      f"apply_fn, variables = jaxkd.from_nnx(module) (for a student, create_train_state(module, ...) does this)."
    )
  linen_module = None
  if isinstance(model, nn.Module):
    linen_module, apply_fn = model, model.apply
  elif callable(model):
    apply_fn = model
    owner = getattr(model, "__self__", None)
    if isinstance(owner, nn.Module) and getattr(model, "__name__", "") == "apply":
      linen_module = owner
  else:
    raise TypeError(f"the {name} must be a linen module, an apply function or a jaxkd.Model, got {model!r}.")
  if train_flag == "auto":
    train_flag = _train_flag_of(type(linen_module).__call__ if linen_module is not None else apply_fn)
  takes_rngs = linen_module is not None or _accepts_keyword(apply_fn, "rngs")
  return Model(
    apply_fn=apply_fn,
    inputs=inputs,
    input_kwargs=input_kwargs or {},
    train_flag=train_flag,
    logits=logits,
    linen_module=linen_module,
    name=name,
    takes_rngs=takes_rngs,
  )


# ------------------------------------------------------------------------------------------ linen feature capture


def _capture_filter(layers: Sequence[str]) -> Callable[[nn.Module, str], bool]:
  wanted = frozenset(layers)
  return lambda module, method_name: method_name == "__call__" and "/".join(module.path) in wanted


def _available(intermediates: Mapping[str, Any], prefix: str = "") -> list[str]:
  names = []
  for key, value in intermediates.items():
    path = f"{prefix}{key}"
    if key == "__call__":
      continue
    if isinstance(value, Mapping):
      if "__call__" in value:
        names.append(path)
      names += _available(value, path + "/")
    else:
      names.append(path)  # a sown value
  return names


def _lookup(intermediates: Mapping[str, Any], layer: str) -> jax.Array:
  """The first recorded value at ``layer`` (``'A/B'``: a module's ``__call__`` output or a sown value)."""
  node: Any = intermediates
  for part in layer.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      raise KeyError(layer)
    node = node[part]
  if isinstance(node, Mapping):
    if "__call__" not in node:
      raise KeyError(layer)
    node = node["__call__"]
  values = node if isinstance(node, tuple | list) else (node,)
  return values[0]
