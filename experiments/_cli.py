"""The experiments' command line and config schema: ``main``, ``--config.quick``, and the rules a config must meet.

Every experiment module ends with ``common.main(get_config, run)``; its ``run`` starts with :func:`check_config`
against rules built from the ones here, so a bad value stops it, named, before anything trains.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import pathlib
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import ml_collections

# ---------------------------------------------------------------- command line


def main(
  get_config: Callable[[], ml_collections.ConfigDict],
  run: Callable[[ml_collections.ConfigDict, pathlib.Path], Any],
  argv: Sequence[str] | None = None,
) -> Any:
  """Parses ``--workdir`` and ``--config.KEY=VALUE`` overrides, then calls ``run(config, workdir)``.

  ``--config.quick=True`` applies the module's ``config.quick_overrides`` to every
  field the command line did not set itself, so ``--config.quick=True
  --config.num_epochs=5`` keeps 5 epochs.
  """
  from absl import flags
  from ml_collections import config_flags

  argv = list(sys.argv if argv is None else argv)
  refuse_repeated_flags(argv)
  flag_values = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.", flag_values=flag_values)
  # config_flags registers one flag per `--config.KEY` it finds in sys_argv, so it must see our argv.
  config_flags.DEFINE_config_dict("config", get_config(), flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  if flag_values.workdir is None:
    raise SystemExit(f"{argv[0]}: --workdir is required")
  config = resolve_quick(flag_values.config, argv)
  workdir = pathlib.Path(flag_values.workdir).expanduser()
  if workdir.exists() and not workdir.is_dir():
    raise SystemExit(
      f"{argv[0]}: --workdir {workdir} is a file, not a directory; pass a directory (it is created if missing)."
    )
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:  # a file on the path above it, no permission, a read-only disk
    raise SystemExit(f"{argv[0]}: cannot create --workdir {workdir} ({type(e).__name__}: {e}).") from e
  try:
    return run(config, workdir)
  except ConfigError as e:  # raised before any training: the message is all the user needs, not a traceback
    raise SystemExit(f"{argv[0]}: {e}") from e


def refuse_repeated_flags(argv: Sequence[str]) -> None:
  """Exits naming a flag given twice: absl appends repeated tuple values (``(4, 8)`` twice trains ``(4, 8, 8, 16)``)
  and keeps the last scalar, so a repeat is refused rather than read one way or the other."""
  seen: dict[str, str] = {}
  for arg in argv[1:]:
    if not arg.startswith("--") or arg == "--":
      continue
    name = arg[2:].split("=", 1)[0]
    if name in seen:
      raise SystemExit(f"{argv[0]}: --{name} is given twice ({seen[name]!r} and {arg!r}); give it once.")
    seen[name] = arg


def resolve_quick(config: ml_collections.ConfigDict, argv: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies ``config.quick_overrides`` when ``config.quick``, except where the command line set a field."""
  config = ml_collections.ConfigDict(config.to_dict())
  if not config.get("quick") or "quick_overrides" not in config:
    return config
  explicit = {arg.split("=", 1)[0][len("--config.") :] for arg in argv if arg.startswith("--config.")}
  for key, value in config.quick_overrides.items():
    if key not in explicit:
      config[key] = value
  return config


# ---------------------------------------------------------------- config checks


class ConfigError(ValueError):
  """Config values that cannot work, all named in one message; raised before anything trains."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a config value must be: ``test(value)`` is True when it is, ``requirement`` says it in words."""

  requirement: str
  test: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_placement(value: Any) -> bool:
  from jaxkd.placement import as_placement

  try:
    as_placement(value)
  except (TypeError, ValueError):
    return False
  return True


POSITIVE = Rule("a number > 0", lambda v: _is_number(v) and v > 0)
NON_NEGATIVE = Rule("a number >= 0", lambda v: _is_number(v) and v >= 0)
FRACTION = Rule("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1)
DROPOUT = Rule("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)
POSITIVE_INT = Rule("an int >= 1", lambda v: _is_int(v) and v >= 1)
NON_NEGATIVE_INT = Rule("an int >= 0", lambda v: _is_int(v) and v >= 0)
SUBSET = Rule("an int >= 0 (0: all)", NON_NEGATIVE_INT.test)
NAME = Rule("a non-empty string", lambda v: isinstance(v, str) and bool(v))
BOOL = Rule("True or False", lambda v: isinstance(v, bool))
PLACEMENT = Rule("'single', 'pmap', 'data_parallel' or 'shard_map'", _is_placement)


def sequence_of(rule: Rule, *, allow_empty: bool = False) -> Rule:
  """A tuple or list (non-empty unless ``allow_empty``) whose every item passes ``rule``; never a string."""
  return Rule(
    f"a {'' if allow_empty else 'non-empty '}sequence, each {rule.requirement}, e.g. '(1, 2)'",
    lambda v: isinstance(v, (tuple, list)) and (allow_empty or len(v) > 0) and all(rule.test(x) for x in v),
  )


def one_of(choices: Iterable[Any]) -> Rule:
  choices = tuple(choices)
  return Rule(f"one of {list(choices)}", lambda v: v in choices)


# The keys load_splits reads; every experiment has them.
DATA_RULES: Mapping[str, Rule] = {
  "dataset": NAME,
  "validation_size": POSITIVE_INT,
  "train_subset": SUBSET,
  "test_subset": SUBSET,
  "batch_size": POSITIVE_INT,
  "placement": PLACEMENT,
}
# The data keys every sub-run depends on (data_dir and source_dir say where the data is, not what it is).
DATA_KEYS = ("dataset", "validation_size", "train_subset", "test_subset", "batch_size")


def check_config(config: ml_collections.ConfigDict, rules: Mapping[str, Rule]) -> None:
  """Checks each key of ``config`` that ``rules`` names (a rule for an absent key is skipped).

  Raises:
    ConfigError: naming every key that breaks its rule, its value and what it must be.
  """
  problems = [
    f"{key}={config[key]!r} must be {rule.requirement}"
    for key, rule in rules.items()
    if key in config and not rule.test(config[key])
  ]
  if problems:
    raise ConfigError(f"invalid config: {'; '.join(problems)}. Fix it on the command line with --config.KEY=VALUE.")


def subconfig(config: ml_collections.ConfigDict, keys: Iterable[str]) -> ml_collections.ConfigDict:
  """The entries of ``config`` that one sub-run depends on: its fingerprint, and the config its checkpoints keep.

  Only those: a sweep's other values or a plot setting changing must not make a finished teacher stale.
  """
  return ml_collections.ConfigDict({key: config[key] for key in keys if key in config})
