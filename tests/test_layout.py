"""The package layout keeps its promises: faces attach their modules, old paths still import, no private imports.

README.md's "Layout" section is the map these tests hold the code to.
"""

import ast
import importlib
import pathlib
import pkgutil

import pytest

import jaxkd

ROOT = pathlib.Path(jaxkd.__file__).parent
FAMILIES = ("data", "lm", "losses", "training")
# Flat paths of jaxkd <= 0.1 and their new homes.
MOVED = {
  "augment": "jaxkd.data.augment",
  "checkpoint": "jaxkd.training.checkpoint",
  "crd": "jaxkd.losses._crd",
  "datasets": "jaxkd.data.datasets",
  "evaluation": "jaxkd.training.evaluation",
  "export": "jaxkd.training.export",
  "features": "jaxkd.losses._features",
  "hooks": "jaxkd.training.hooks",
  "logit_cache": "jaxkd.data.logit_cache",
  "logit_losses": "jaxkd.losses._logit",
  "metrics": "jaxkd.training.metrics",
  "on_policy": "jaxkd.lm.on_policy",
  "preemption": "jaxkd.training.preemption",
  "relations": "jaxkd.losses._relations",
  "sparse_losses": "jaxkd.losses._sparse",
  "text": "jaxkd.lm.text",
  "topk_cache": "jaxkd.lm.topk_cache",
  "trainer": "jaxkd.training.loop",
  "transformer": "jaxkd.lm.transformer",
  "utils": "jaxkd.artifacts",
}


def _modules() -> list[str]:
  return sorted(m.name for m in pkgutil.walk_packages([str(ROOT)], prefix="jaxkd."))


def _source_files() -> list[pathlib.Path]:
  return sorted(ROOT.rglob("*.py"))


def test_import_jaxkd_attaches_every_public_module():
  missing = []
  for name in _modules():
    parts = name.split(".")[1:]
    if any(part.startswith("_") for part in parts):
      continue
    node = jaxkd
    for part in parts:
      node = getattr(node, part, None)
      if node is None:
        missing.append(name)
        break
  assert not missing, f"`import jaxkd` leaves these modules unattached: {missing}"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_flat_paths_name_the_moved_modules(old):
  new = importlib.import_module(MOVED[old])
  assert importlib.import_module(f"jaxkd.{old}") is new
  assert getattr(jaxkd, old) is new


def test_old_from_imports_still_work():
  from jaxkd.topk_cache import write_topk_cache
  from jaxkd.trainer import fit

  assert fit is jaxkd.training.fit
  assert write_topk_cache is jaxkd.lm.write_topk_cache


@pytest.mark.parametrize("face", ["jaxkd", *(f"jaxkd.{f}" for f in FAMILIES)])
def test_faces_export_sorted_names_that_exist(face):
  module = importlib.import_module(face)
  names = list(module.__all__)
  assert names == sorted(names), f"{face}.__all__ is not sorted"
  assert len(names) == len(set(names)), f"{face}.__all__ repeats names"
  assert [n for n in names if not hasattr(module, n)] == []


def test_losses_face_does_not_leak_checks():
  assert not hasattr(jaxkd.losses, "check_temperature")


def _is_module(dotted: str) -> bool:
  path = ROOT.parent.joinpath(*dotted.split("."))
  return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_no_module_imports_another_modules_private_names():
  """Private modules (``jaxkd._checks``) share helpers through their public names; ``_names`` stay in their file."""
  offenders = []
  for path in _source_files():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxkd"):
        private = [a.name for a in node.names if a.name.startswith("_") and not _is_module(f"{node.module}.{a.name}")]
        if private:
          offenders.append(f"{path.relative_to(ROOT.parent)}: from {node.module} import {private}")
  assert not offenders, offenders


def test_core_modules_do_not_import_families_at_import_time():
  """Layers: the losses (pure functions) under the core (jaxkd/*.py) under data/, lm/ and training/, never upward."""
  upper = {"data", "lm", "training"}
  offenders = []
  for path in ROOT.glob("*.py"):
    if path.name == "__init__.py":
      continue
    for node in ast.parse(path.read_text()).body:  # top-level statements only: lazy imports inside functions are fine
      if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxkd":
        parts = node.module.split(".")
        names = {a.name for a in node.names} if parts == ["jaxkd"] else {parts[1]}
        if names & upper:
          offenders.append(f"{path.name}: from {node.module} import {sorted(names & upper)}")
  assert not offenders, offenders


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
  """A function's lines without its docstring (the losses' docstrings hold their math and examples)."""
  lines = node.end_lineno - node.lineno + 1
  first = node.body[0]
  if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
    lines -= first.end_lineno - first.lineno + 1
  return lines


@pytest.mark.parametrize("tree", ["jaxkd", "experiments", "benchmarks"])
def test_file_and_function_sizes(tree):
  """No file over 600 lines, no function over 80 lines of code (STYLE.md: a layout a newcomer reads like a map)."""
  long_files, long_functions = [], []
  for path in sorted((ROOT.parent / tree).rglob("*.py")):
    text = path.read_text()
    if text.count("\n") > 600:
      long_files.append(f"{path.relative_to(ROOT.parent)} ({text.count(chr(10))} lines)")
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _code_lines(node) > 80:
        long_functions.append(f"{path.relative_to(ROOT.parent)}:{node.name} ({_code_lines(node)} lines)")
  assert not long_files and not long_functions, (long_files, long_functions)
