"""Small helpers shared across jaxkd modules."""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np

__all__ = ["tree_fingerprint"]


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
