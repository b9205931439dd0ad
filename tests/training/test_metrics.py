"""jaxkd.training.metrics: the JSON-lines log, TensorBoard event files, window means, the no-op writer off process 0."""

import json
import math
import struct
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from jaxkd.training import metrics


def _read_events(logdir):
  """Every event in ``logdir``'s event files, oldest file first, checking each TFRecord's checksums.

  The ``tensorboard`` package (whose event_accumulator would do this) is not installed here, so this
  parses the TFRecord framing itself: u64 length, masked CRC32C of it, payload, masked CRC32C of that.
  """
  events = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      header = data[pos : pos + 8]
      (length,) = struct.unpack("<Q", header)
      (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
      payload = data[pos + 12 : pos + 12 + length]
      (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
      assert header_crc == masked_crc32c(header) and payload_crc == masked_crc32c(payload), path
      events.append(event_pb2.Event.FromString(payload))
      pos += 16 + length
  return events


def _scalars(logdir):
  """{tag: [(step, value), ...]} from the event files' simple_value summaries."""
  out = {}
  for event in _read_events(logdir):
    for value in event.summary.value:
      out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def _without_time(records):
  return [{k: v for k, v in r.items() if k != "time"} for r in records]


def test_jsonl_records_are_readable_before_close(tmp_path):
  writer = metrics.MetricsWriter(tmp_path, tensorboard=False, process_index=0)
  writer.write(10, {"loss": np.float32(0.5), "accuracy": jnp.asarray(0.25)})
  writer.write(10, {"accuracy": 0.75}, prefix="eval_")
  # Line-buffered: both lines are on disk while the file is still open.
  records = metrics.read_metrics(tmp_path)
  assert _without_time(records) == [
    {"step": 10, "loss": 0.5, "accuracy": 0.25},
    {"step": 10, "eval_accuracy": 0.75},
  ]
  assert list(records[0]) == ["step", "time", "loss", "accuracy"]
  assert all(isinstance(r["time"], float) for r in records)
  writer.close()
  assert not (tmp_path / metrics.TENSORBOARD_DIR).exists()


def test_appends_to_an_existing_log(tmp_path):
  for step in (1, 2):
    with metrics.MetricsWriter(tmp_path, tensorboard=False, process_index=0) as writer:
      writer.write(step, {"loss": float(step)})
  assert [r["step"] for r in metrics.read_metrics(tmp_path / metrics.METRICS_FILE)] == [1, 2]


def test_tensorboard_tags_and_values(tmp_path):
  with metrics.MetricsWriter(tmp_path) as writer:  # process_index from jax: 0 here.
    writer.write(1, {"loss": 2.5, "accuracy": np.float32(0.5)})
    writer.write(2, {"loss": jnp.asarray(1.5), "steps": 2})
    writer.write(2, {"accuracy": 0.875}, prefix="eval_")
    writer.write(2, {"kl": 0.125}, prefix="val/")
    writer.flush()
  scalars = _scalars(tmp_path / metrics.TENSORBOARD_DIR)
  assert scalars == {
    "train/loss": [(1, 2.5), (2, 1.5)],
    "train/accuracy": [(1, 0.5)],
    "train/steps": [(2, 2.0)],
    "eval/accuracy": [(2, 0.875)],
    "val/kl": [(2, 0.125)],
  }
  # The log and TensorBoard share the write's timestamp.
  records = metrics.read_metrics(tmp_path)
  walltimes = {e.wall_time for e in _read_events(tmp_path / metrics.TENSORBOARD_DIR) if e.summary.value}
  assert walltimes == {r["time"] for r in records}


def test_nonfinite_values_are_null_in_the_log_and_skipped_in_tensorboard(tmp_path):
  with metrics.MetricsWriter(tmp_path, process_index=0) as writer:
    writer.write(5, {"loss": np.float32(np.nan), "grad_norm": math.inf, "accuracy": 0.5, "per_class": [1.0, np.nan]})
  text = (tmp_path / metrics.METRICS_FILE).read_text()
  assert "NaN" not in text and "Infinity" not in text
  (record,) = _without_time(json.loads(line) for line in text.splitlines())
  assert record == {"step": 5, "loss": None, "grad_norm": None, "accuracy": 0.5, "per_class": [1.0, None]}
  # Only the finite scalar reaches TensorBoard; a list never does.
  assert _scalars(tmp_path / metrics.TENSORBOARD_DIR) == {"train/accuracy": [(5, 0.5)]}


def test_resumed_from_hides_the_earlier_runs_later_steps(tmp_path):
  with metrics.MetricsWriter(tmp_path, process_index=0) as writer:
    writer.write(10, {"loss": 1.0})
  with metrics.MetricsWriter(tmp_path, process_index=0, resumed_from=10) as writer:
    writer.write(20, {"loss": 0.5})
  starts = [e.step for e in _read_events(tmp_path / metrics.TENSORBOARD_DIR) if e.HasField("session_log")]
  assert starts == [11]  # TensorBoard drops earlier events at steps >= 11.


def _write_steps(workdir, steps, **kwargs):
  with metrics.MetricsWriter(workdir, tensorboard=False, process_index=0, **kwargs) as writer:
    for step in steps:
      writer.write(step, {"loss": float(step)})
      if step % 10 == 0:
        writer.write(step, {"accuracy": 0.5}, prefix="eval_")


def test_resuming_drops_the_records_after_the_resumed_step(tmp_path):
  # A run killed (kill -9) at step 25 after its last checkpoint at step 10, mid-way through a write.
  _write_steps(tmp_path, [5, 10, 15, 20, 25])
  path = tmp_path / metrics.METRICS_FILE
  with path.open("a") as f:
    f.write('{"step": 30, "lo')
  path.chmod(0o644)
  _write_steps(tmp_path, [15, 20], resumed_from=10)
  records = metrics.read_metrics(tmp_path)
  assert [(r["step"], sorted(set(r) - {"step", "time"})) for r in records] == [
    (5, ["loss"]),
    (10, ["loss"]),
    (10, ["eval_accuracy"]),  # The resumed step's own records stay: the checkpoint was taken after them.
    (15, ["loss"]),
    (20, ["loss"]),
    (20, ["eval_accuracy"]),
  ]
  assert path.stat().st_mode & 0o777 == 0o644
  assert sorted(p.name for p in tmp_path.iterdir()) == [metrics.METRICS_FILE]  # no temporary file left


def test_a_partial_last_line_is_dropped_before_appending(tmp_path):
  path = tmp_path / metrics.METRICS_FILE
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
  _write_steps(tmp_path, [3])
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 3]
  # A last record that lost only its newline is kept.
  path.write_text('{"step": 1, "loss": 1.0}')
  _write_steps(tmp_path, [2])
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2]


def test_a_failed_rewrite_leaves_the_log_as_it_was(tmp_path, monkeypatch):
  _write_steps(tmp_path, [5, 10, 15])
  path = tmp_path / metrics.METRICS_FILE
  before = path.read_bytes()

  def crash(*args):
    raise OSError("disk gone")

  monkeypatch.setattr(metrics.os, "replace", crash)
  with pytest.raises(OSError, match="disk gone"):
    metrics.MetricsWriter(tmp_path, tensorboard=False, process_index=0, resumed_from=5)
  assert path.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == [metrics.METRICS_FILE]


def test_resuming_on_another_process_leaves_the_log_alone(tmp_path):
  _write_steps(tmp_path, [5, 10])
  before = (tmp_path / metrics.METRICS_FILE).read_bytes()
  with metrics.MetricsWriter(tmp_path, tensorboard=False, process_index=1, resumed_from=0):
    pass
  assert (tmp_path / metrics.METRICS_FILE).read_bytes() == before


def test_other_processes_write_nothing(tmp_path):
  workdir = tmp_path / "run"
  with metrics.MetricsWriter(workdir, process_index=1) as writer:
    assert not writer.active
    writer.write(1, {"loss": 1.0})
    writer.flush()
  assert not workdir.exists()


def test_write_after_close_raises_and_close_twice_is_harmless(tmp_path):
  writer = metrics.MetricsWriter(tmp_path, process_index=0)
  writer.close()
  writer.close()
  with pytest.raises(ValueError, match="after close"):
    writer.write(1, {"loss": 1.0})


def test_metric_names_must_not_clash_with_step_or_time(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False, process_index=0) as writer:
    with pytest.raises(ValueError, match="clash"):
      writer.write(1, {"time": 3.0})
    writer.write(1, {"time": 3.0}, prefix="eval_")  # eval_time is fine.
  assert _without_time(metrics.read_metrics(tmp_path)) == [{"step": 1, "eval_time": 3.0}]


def test_missing_tensorboardx_says_how_to_fix_it(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # Makes `import tensorboardX` raise ImportError.
  with pytest.raises(ImportError, match="pip install tensorboardX.*tensorboard=False"):
    metrics.MetricsWriter(tmp_path, process_index=0)
  with pytest.raises(ImportError):  # On every process, not only the one that writes.
    metrics.MetricsWriter(tmp_path, process_index=1)
  with metrics.MetricsWriter(tmp_path, tensorboard=False, process_index=0) as writer:
    writer.write(1, {"loss": 1.0})
  assert len(metrics.read_metrics(tmp_path)) == 1


def test_read_metrics_ignores_a_partial_last_line_only(tmp_path):
  path = tmp_path / metrics.METRICS_FILE
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
  assert metrics.read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]
  path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.0}\n')
  with pytest.raises(json.JSONDecodeError):
    metrics.read_metrics(tmp_path)


def test_to_python():
  assert metrics.to_python(np.float32(0.5)) == 0.5 and type(metrics.to_python(np.float32(0.5))) is float
  assert metrics.to_python(jnp.asarray(3)) == 3 and type(metrics.to_python(jnp.asarray(3))) is int
  assert metrics.to_python(jnp.arange(4.0).reshape(2, 2)) == [[0.0, 1.0], [2.0, 3.0]]
  assert metrics.to_python("text") == "text"
  assert metrics.to_python(0.25) == 0.25


def test_mean_metrics_over_scalars():
  window = [{"loss": jnp.asarray(float(i)), "accuracy": np.float32(0.5), "nonfinite": jnp.asarray(0)} for i in range(4)]
  assert metrics.mean_metrics(window) == {"loss": 1.5, "accuracy": 0.5, "nonfinite": 0.0, "steps": 4}


def test_mean_metrics_counts_every_element_of_an_array_as_a_step():
  window = [
    {"loss": jnp.asarray([1.0, 2.0, 3.0]), "nonfinite": jnp.asarray([0, 0, 0])},
    {"loss": jnp.asarray([4.0, 5.0, 6.0]), "nonfinite": jnp.asarray([0, 0, 0])},
  ]
  assert metrics.mean_metrics(window) == {"loss": 3.5, "nonfinite": 0.0, "steps": 6}


def test_mean_metrics_sums_nonfinite_and_averages_only_finite_values():
  window = [
    {
      "loss": jnp.asarray([1.0, jnp.nan]),
      "grad_norm": jnp.asarray([jnp.inf, jnp.nan]),
      "nonfinite": jnp.asarray([0, 1]),
    },
    {"loss": jnp.asarray(3.0), "grad_norm": jnp.asarray(jnp.nan), "nonfinite": jnp.asarray(0)},
    {"loss": jnp.asarray(jnp.inf), "grad_norm": jnp.asarray(jnp.nan), "nonfinite": jnp.asarray(1)},
  ]
  out = metrics.mean_metrics(window)
  assert out["loss"] == 2.0
  assert math.isnan(out["grad_norm"])
  assert out["nonfinite"] == 2.0
  assert out["steps"] == 4


def test_mean_metrics_steps_without_a_loss_and_for_an_empty_window():
  assert metrics.mean_metrics([{"kl": np.ones(3)}, {"kl": np.zeros(2)}]) == {"kl": 0.6, "steps": 5}
  assert metrics.mean_metrics([]) == {"steps": 0}


def test_means_write_to_the_log_and_tensorboard(tmp_path):
  window = [{"loss": jnp.asarray([1.0, jnp.nan]), "nonfinite": jnp.asarray([0, 1])}]
  with metrics.MetricsWriter(tmp_path, process_index=0) as writer:
    writer.write(2, metrics.mean_metrics(window))
  assert _without_time(metrics.read_metrics(tmp_path)) == [{"step": 2, "loss": 1.0, "nonfinite": 1.0, "steps": 2}]
  assert _scalars(tmp_path / metrics.TENSORBOARD_DIR) == {
    "train/loss": [(2, 1.0)],
    "train/nonfinite": [(2, 1.0)],
    "train/steps": [(2, 2.0)],
  }
