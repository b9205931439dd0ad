"""Small helpers shared across jaxkd modules."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = ["tree_fingerprint", "write_atomically"]


def tree_fingerprint(tree: Any) -> str:
  """Hex SHA-256 of a pytree's structure and contents (paths, dtypes, shapes, bytes).

  Any change to any leaf, however small, changes it. Used to key the teacher-logit
  cache and to record which teacher checkpoint a student learned from.
  """
  digest = hashlib.sha256()
  leaves, treedef = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
  digest.update(str(treedef).encode())
  for path, leaf in leaves:
    leaf = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype.str}|{leaf.shape}|".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def write_atomically(path: str, write: Callable[[Any], None]) -> None:
  """Calls ``write(file)`` on a temporary file beside ``path``, then renames it to ``path``.

  A reader never sees a half-written file: a crash leaves either the old file or none (the temporary is removed).
  The parent directory is created when missing.
  """
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
  try:
    with open(tmp, "wb") as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
