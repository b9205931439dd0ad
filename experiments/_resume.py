"""Resumable, fingerprinted sub-runs: the bookkeeping every experiment's sub-runs share.

A sub-run lives in ``workdir/name``. ``inputs.json`` records its description (everything that determines what it
computes, as JSON) and that description's fingerprint; ``result.json``, written last, repeats the fingerprint and
marks it finished. On a rerun a finished sub-run of the same fingerprint is reused, an unfinished one is left in
place to resume from its checkpoints, and one of other inputs (or from before fingerprints) is moved aside to
``workdir/name.stale-N`` with a message naming what changed, so that no result mixes two settings.

The description is the one value: its fingerprint is computed from it (:func:`fingerprint`), never from a second
list of the same arguments kept in step by hand.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

from jaxkd import artifacts
from jaxkd.training.metrics import to_python

INPUTS_FILE = "inputs.json"
RESULT_FILE = "result.json"


def write_json(path: os.PathLike | str, data: Any) -> None:
  """The experiments' JSON files: atomic (:func:`jaxkd.artifacts.write_json`), keys in the order written, NumPy
  and JAX scalars as Python numbers."""
  artifacts.write_json(path, data, indent=2, sort_keys=False, default=to_python)


def canonical(description: Mapping[str, Any]) -> dict[str, Any]:
  """``description`` after one JSON round trip: tuples become lists, so what is compared is what the file holds."""
  return json.loads(json.dumps(description, sort_keys=True, default=to_python))


def fingerprint(description: Mapping[str, Any]) -> str:
  """The first 32 hex digits of the description's canonical JSON digest: what decides whether a run is reused."""
  return artifacts.json_digest(canonical(description))[:32]


def resumable(
  workdir: pathlib.Path,
  name: str,
  description: Mapping[str, Any],
  work: Callable[[pathlib.Path], dict],
  *,
  say_reused: bool = True,
) -> dict[str, Any]:
  """The finished result of sub-run ``name`` of ``description``, or ``work(run_dir)``'s, recorded as finished.

  ``work`` trains (resuming from what ``run_dir`` holds) and returns the result; the fingerprint is put first in it
  and it is written to ``result.json`` after ``work`` returns, so a killed run is never taken for a finished one.
  ``say_reused`` prints a line when a finished result is reused (the image experiments reuse silently: a rerun's
  output then names only what was trained).
  """
  description = canonical(description)
  key = fingerprint(description)
  run_dir = workdir / name
  finished = finished_or_set_aside(run_dir, name, key, description)
  if finished is not None:
    if say_reused:
      print(f"{name}: finished earlier with these inputs; reusing its result.", flush=True)
    return finished
  run_dir.mkdir(parents=True, exist_ok=True)
  write_json(run_dir / INPUTS_FILE, {"fingerprint": key, "inputs": description})
  result = {"fingerprint": key, **work(run_dir)}
  write_json(run_dir / RESULT_FILE, result)
  return result


def finished_or_set_aside(
  run_dir: pathlib.Path, name: str, fingerprint: str, inputs: Mapping[str, Any]
) -> dict[str, Any] | None:
  """A finished sub-run's result when its fingerprint is ``fingerprint``; else None, after moving a stale one aside.

  An unfinished sub-run with this fingerprint stays where it is, to resume.
  """
  if not run_dir.is_dir():
    return None
  recorded = read_dict(run_dir / INPUTS_FILE)
  result = read_dict(run_dir / RESULT_FILE)
  if result is not None and result.get("fingerprint") == fingerprint:
    return result
  if result is not None:
    fingerprinted = "fingerprint" in result
    why = "finished with other inputs" if fingerprinted else "finished before sub-runs recorded their inputs"
  elif (run_dir / RESULT_FILE).exists():
    why = "its result.json is unreadable"
  elif (recorded is not None and recorded.get("fingerprint") == fingerprint) or not any(run_dir.iterdir()):
    return None
  else:
    why = "an unfinished run of other inputs" if recorded is not None else "an unfinished run without recorded inputs"
  stale = set_aside(run_dir)
  lines = [f"{name}: {why}; moved it to {stale} and training it again from scratch."]
  if recorded is not None and isinstance(recorded.get("inputs"), Mapping):
    lines += [f"  changed {key}: {old} -> {new}" for key, (old, new) in _changes(recorded["inputs"], inputs).items()]
  print("\n".join(lines), flush=True)
  return None


def read_dict(path: pathlib.Path) -> dict[str, Any] | None:
  """The JSON object in ``path``; None when it is missing (an older sub-run) or unreadable (half-written)."""
  try:
    value = artifacts.read_json(path)
  except (OSError, ValueError):  # ArtifactError is a ValueError
    return None
  return value if isinstance(value, dict) else None


def set_aside(run_dir: pathlib.Path) -> pathlib.Path:
  """Renames ``run_dir`` to the first free ``run_dir.stale-N`` and returns that path."""
  n = 1
  while run_dir.with_name(f"{run_dir.name}.stale-{n}").exists():
    n += 1
  stale = run_dir.with_name(f"{run_dir.name}.stale-{n}")
  run_dir.rename(stale)
  return stale


def _changes(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[str, str]]:
  """``{'dotted.key': (old, new)}`` for each leaf that differs, values shortened for printing."""
  if isinstance(old, Mapping) and isinstance(new, Mapping):
    changes = {}
    for key in sorted(set(old) | set(new)):
      changes |= _changes(old.get(key, "(absent)"), new.get(key, "(absent)"), f"{prefix}.{key}" if prefix else key)
    return changes
  if old == new:
    return {}

  def short(value: Any) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= 100 else text[:97] + "..."

  return {prefix or "(all)": (short(old), short(new))}
