"""Run metrics on disk, for watching a run: a JSON-lines log and TensorBoard event files.

:class:`MetricsWriter` appends one JSON object per :meth:`~MetricsWriter.write` to
``workdir/metrics.jsonl`` and writes the same scalars to TensorBoard event files under
``workdir/tensorboard/`` (through ``tensorboardX``, so TensorFlow is not needed); point
``tensorboard --logdir workdir/tensorboard`` at a live run. :func:`mean_metrics` turns a
logging window of step metrics into the means to write, with one host transfer, and
:func:`read_metrics` reads the log back.

Names: ``write(step, {'accuracy': 0.9}, prefix='eval_')`` writes the key ``eval_accuracy``
to the log and the tag ``eval/accuracy`` to TensorBoard. The tag's group is the prefix
without its trailing ``_`` (or ``/``); no prefix means ``train``, so ``{'loss': ...}``
becomes the tag ``train/loss`` and the log key ``loss``.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import jax
import numpy as np

__all__ = ["METRICS_FILE", "TENSORBOARD_DIR", "MetricsWriter", "mean_metrics", "read_metrics", "to_python"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Keys every log record has; a metric of the same name (without a prefix) would overwrite them.
_RESERVED_KEYS = ("step", "time")
# tensorboardX flushes every 120 s by default, too slow to watch a run by; each flush is one small write.
_TB_FLUSH_SECS = 10


def to_python(value: Any) -> Any:
  """A numpy or JAX scalar as a Python scalar (``float``, ``int``, ``bool``), an array as a (nested) list.

  Anything else is returned as it is.

  >>> to_python(np.float32(0.5)), to_python(np.arange(3)), to_python("a")
  (0.5, [0, 1, 2], 'a')
  """
  if isinstance(value, np.ndarray | np.generic | jax.Array):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


def _json_safe(value: Any) -> Any:
  # Python's json writes NaN and Infinity, which strict JSON parsers (jq, JavaScript) reject: null instead.
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, list | tuple):
    return [_json_safe(v) for v in value]
  if isinstance(value, Mapping):
    return {str(k): _json_safe(v) for k, v in value.items()}
  return value


def _tag_group(prefix: str) -> str:
  return prefix.rstrip("_/") or "train"


def _summary_writer_class() -> type:
  # Imported here, not at module level, so that importing jaxkd never loads tensorboardX.
  try:
    from tensorboardX import SummaryWriter
  except ImportError as e:
    raise ImportError(
      "MetricsWriter(tensorboard=True) needs tensorboardX: `pip install tensorboardX`, or pass tensorboard=False "
      "to write only metrics.jsonl."
    ) from e
  return SummaryWriter


class MetricsWriter:
  """Writes step metrics to ``workdir/metrics.jsonl`` and TensorBoard event files under ``workdir/tensorboard/``.

  Only process 0 writes; on every other process this is a no-op writer (nothing is created), so every
  process can make and call one unconditionally.

  Each :meth:`write` appends one line ``{"step": ..., "time": ..., <prefix><name>: value, ...}``;
  the file is line-buffered, so a killed run loses nothing already written (a line cut short by the kill is
  dropped when the next writer opens the file). Non-finite values are
  written as ``null`` (keeping the file strict JSON) and left out of TensorBoard. Scalars (floats,
  ints, bools) go to TensorBoard as ``<group>/<name>``, the group being the prefix without its
  trailing ``_`` or ``train`` without one (see the module docstring); other values (lists,
  strings) only go to the log.

  Args:
    workdir: the run's directory (created if missing).
    tensorboard: also write TensorBoard event files; False writes only ``metrics.jsonl``
      and does not need ``tensorboardX``.
    process_index: this process's index; defaults to :func:`jax.process_index`.
    resumed_from: the step a resumed run restarted from. The earlier run's records after that step,
      which the resumed run writes again, are dropped from ``metrics.jsonl`` (the file is rewritten
      atomically before anything is appended) and hidden in TensorBoard.

  >>> import tempfile
  >>> with tempfile.TemporaryDirectory() as workdir:
  ...   with MetricsWriter(workdir, tensorboard=False, process_index=0) as writer:
  ...     writer.write(100, {"loss": 0.5})
  ...     writer.write(100, {"accuracy": 0.75}, prefix="eval_")
  ...   [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(workdir)]
  [{'step': 100, 'loss': 0.5}, {'step': 100, 'eval_accuracy': 0.75}]
  """

  def __init__(
    self,
    workdir: os.PathLike | str,
    *,
    tensorboard: bool = True,
    process_index: int | None = None,
    resumed_from: int | None = None,
  ):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / METRICS_FILE
    # Checked on every process, not only the writing one, so a missing package fails all of them alike
    # rather than leaving the others waiting in a collective for a process 0 that has died.
    summary_writer = _summary_writer_class() if tensorboard else None
    if process_index is None:
      process_index = jax.process_index()
    self.active = process_index == 0
    self._file = None
    self._tb = None
    self._closed = False
    if not self.active:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    _drop_records_after(self.path, resumed_from)
    self._file = self.path.open("a", buffering=1)
    if summary_writer is not None:
      # TensorBoard discards earlier events at steps >= purge_step; the resumed step itself was kept.
      purge_step = None if resumed_from is None else int(resumed_from) + 1
      self._tb = summary_writer(
        logdir=str(self.workdir / TENSORBOARD_DIR), purge_step=purge_step, flush_secs=_TB_FLUSH_SECS
      )

  def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "") -> None:
    """Appends ``metrics`` at ``step`` to the log and TensorBoard, each name prefixed with ``prefix``.

    Values may be Python, numpy or (addressable) JAX scalars or arrays.
    """
    if self._closed:
      raise ValueError("MetricsWriter.write after close()")
    if not self.active:
      return
    step = int(to_python(step))
    now = time.time()
    values = {f"{prefix}{key}": to_python(value) for key, value in metrics.items()}
    clashes = [key for key in values if key in _RESERVED_KEYS]
    if clashes:
      raise ValueError(f"metric names {clashes} clash with the log's own keys {_RESERVED_KEYS}; rename them")
    record = {"step": step, "time": now}
    record.update({key: _json_safe(value) for key, value in values.items()})
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    if self._tb is not None:
      group = _tag_group(prefix)
      for key, value in metrics.items():
        value = values[f"{prefix}{key}"]
        if isinstance(value, int | float) and math.isfinite(value):
          self._tb.add_scalar(f"{group}/{key}", value, global_step=step, walltime=now)

  def flush(self) -> None:
    """Pushes buffered TensorBoard events to disk (the log is already flushed line by line)."""
    if self._file is not None and not self._closed:
      self._file.flush()
    if self._tb is not None and not self._closed:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes both outputs; closing twice is harmless."""
    if self._closed:
      return
    self._closed = True
    if self._tb is not None:
      self._tb.close()
    if self._file is not None:
      self._file.close()

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(
    self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
  ) -> None:
    self.close()


def _is_record_after(line: str, step: int | None) -> bool:
  if step is None:
    return False
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return False  # Not a record this writer made: left as it is.
  return isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step


def _drop_records_after(path: pathlib.Path, step: int | None) -> None:
  """Rewrites ``path`` without its records after ``step`` (none when None) and without a partial last line.

  A run killed after its last checkpoint (``kill -9``, a lost machine) has logged steps that its resumed run
  logs again; left in place they would be duplicates. A write cut short leaves a last line without its newline,
  onto which the next record would be appended. The file is left alone when neither is there, and otherwise
  replaced whole (temporary file, then :func:`os.replace`), so a crash in the middle leaves the old file.
  """
  if not path.exists():
    return
  lines = path.read_text().split("\n")
  complete, last = lines[:-1], lines[-1]  # ``last`` is "" when the file ends with its newline.
  if last:
    try:
      json.loads(last)
      complete.append(last)  # Only the newline was lost.
    except json.JSONDecodeError:
      pass
  kept = [line for line in complete if not _is_record_after(line, step)]
  if not last and len(kept) == len(complete):
    return
  fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as tmp:
      tmp.write("".join(line + "\n" for line in kept))
      tmp.flush()
      os.fsync(tmp.fileno())
    os.chmod(tmp_name, path.stat().st_mode & 0o777)  # mkstemp's file is private (0600); keep the log's mode.
    os.replace(tmp_name, path)
  except BaseException:
    pathlib.Path(tmp_name).unlink(missing_ok=True)
    raise


def mean_metrics(window: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """The means of a logging window of step metrics, fetched from the devices in one transfer.

  Each entry of ``window`` maps names to a scalar or an array; an array is flattened and each
  of its elements counts as one step's value (a step function run for ``n`` steps per call
  returns ``[n]`` per metric). A pmap step's per-device copies are identical, so the caller
  takes device 0's before appending, or they would count as steps too.

  Returns:
    For ``nonfinite``, the sum (the number of steps whose update was skipped); for every other
    name, the mean of its finite values (NaN if it has none); and ``steps``, the number of step
    values seen (the elements of ``loss``, or of the first name if there is no ``loss``).

  >>> window = [
  ...   {"loss": np.float32(2.0), "nonfinite": np.int32(0)},
  ...   {"loss": np.array([1.0, np.nan, 3.0]), "nonfinite": np.array([0, 1, 0])},
  ... ]
  >>> mean_metrics(window)
  {'loss': 2.0, 'nonfinite': 1.0, 'steps': 4}
  """
  window = jax.device_get(list(window))
  names = list(dict.fromkeys(name for entry in window for name in entry))
  out: dict[str, float] = {}
  sizes: dict[str, int] = {}
  for name in names:
    values = np.concatenate(
      [np.asarray(entry[name], dtype=np.float64).reshape(-1) for entry in window if name in entry]
    )
    sizes[name] = values.size
    if name == "nonfinite":
      out[name] = float(values.sum())
    else:
      finite = values[np.isfinite(values)]
      out[name] = float(finite.mean()) if finite.size else float("nan")
  out["steps"] = sizes.get("loss", sizes[names[0]]) if names else 0
  return out


def read_metrics(workdir: os.PathLike | str) -> list[dict[str, Any]]:
  """The records of ``workdir/metrics.jsonl`` (or of the ``.jsonl`` file given), in the order written.

  ``null`` values (non-finite when written) come back as None. A partial last line, left by a
  process killed in mid-write, is ignored; a malformed line anywhere else raises.
  """
  path = pathlib.Path(workdir)
  if path.is_dir():
    path = path / METRICS_FILE
  lines = path.read_text().split("\n")
  records = []
  for index, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if index == len(lines) - 1:  # No newline after it: the write never finished.
        break
      raise
  return records
