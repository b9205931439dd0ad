"""Language-model distillation step: speed against hand-written JAX and PyTorch, chunked-head memory, top-k cache.

Three tables, each timed in one run with the variants in alternation (:mod:`benchmarks.common`), all on the same
:class:`jaxkd.lm.transformer.TransformerLM` teacher and student (``lm_config`` presets) and random tokens:

1. **speed**: tokens/s of the live-teacher LM KD step, ``alpha * KL(teacher || student) + (1 - alpha) * CE`` at
   ``T = 1``, ``alpha = 0.5``, a masked mean over tokens, ``optax.adamw(1e-3)``:

   * ``jaxkd``: ``make_train_step(teacher_apply_fn=lm.lm_model(teacher), objective=lm.lm_objective('forward',
     alpha=0.5), placement='single')`` called as a user calls it (host-side checks included), batch placed with
     ``step.placement.put_batch``;
   * ``jaxkd_noskip``: the same with ``skip_nonfinite=False`` (no gradient norm, no conditional update);
   * ``hand``: the same step written directly (:func:`make_hand_step`): teacher ``apply`` under
     ``stop_gradient``, student ``apply``, ``log_softmax``, the masked mean, ``jax.value_and_grad``, ``tx.update``,
     one ``jax.jit`` with params and optimizer state donated;
   * ``torch``: the same step in PyTorch eager as TRL's and DistillKit's trainers write it (:func:`torch_variant`):
     a GPT-style model of the same size and weights (pre-RMSNorm, RoPE, causal ``F.scaled_dot_product_attention``,
     tanh-GELU MLP, tied embeddings), teacher under ``torch.no_grad()``, ``0.5 * F.cross_entropy + 0.5 *
     F.kl_div(F.log_softmax(s), F.log_softmax(t), log_target=True, reduction='batchmean')`` over the ``[tokens,
     vocab]`` logits (a per-token mean), ``torch.optim.AdamW(lr=1e-3, weight_decay=1e-4)`` (optax's adamw defaults),
     ``torch.set_num_threads(cores XLA uses)``.

   * ``hand_metrics``: ``hand`` plus the metrics jaxkd's step reports, written out (:func:`hand_metrics`: CE,
     perplexity, accuracy, KL, teacher CE, accuracy and perplexity, agreement), to show what they cost.

   ``gflop`` and ``gb_accessed`` are XLA's counts (``compiled.cost_analysis()``) for jaxkd / hand / hand_metrics:
   what each step does, whatever the load of the machine. Target: **jaxkd/hand >= 0.97**.

2. **chunking**: the step with the output head applied to all positions at once (``dense``), per chunk of positions
   in a rematerialised ``lax.scan`` (``make_train_step(chunk_size=c)``, ``chunk<c>``), and the cached top-k step
   (``topk<k>``: ``lm_objective('topk')``, no teacher network, the batch carrying the teacher's top k). Step time in
   alternation at the speed table's size, and memory from the compiled step without running it, at a larger
   vocabulary and length: ``step.lower(state, teacher_variables, batch).compile().memory_analysis()`` with placed
   zeros of the right shapes (``TrainStep.lower`` lowers the jit a call runs after its host-side checks, so the
   same computation and the same compilation a call makes). ``temp`` is XLA's ``temp_size_in_bytes`` (buffers live
   inside the step), ``total`` is ``argument + output - alias + temp`` (the donated state counted once);
   ``timed_size_temp_mb`` is ``temp`` at the timed size. The hand-written step's memory is the last row.
   Target: **chunked/dense total <= 0.25**.

3. **cache**: a top-k cache (``k`` logits, indices, normaliser) of ``epoch_sequences`` random token windows written
   with :func:`jaxkd.lm.topk_cache.write_topk_cache` to a temporary directory, then whole epochs (shuffled, batches
   read inside the timed epoch) of the cached top-k step against epochs of the scratch step (cross-entropy only,
   ``make_train_step()`` without a teacher), each pair reading its batches the same way:

   * ``scratch_items`` / ``cached_items``: ``grain.MapDataset.source(...)`` of :class:`jaxkd.lm.text.TokenSequences`
     (scratch) or of :class:`jaxkd.lm.topk_cache.JoinedSource` over it (cached; token digests checked per sequence),
     ``.shuffle(seed).batch(batch)``, grain's per-item reads stacked;
   * ``scratch_batched`` / ``cached_batched``: :func:`jaxkd.lm.text.token_batches` (one vectorised gather per batch)
     and the same grain pipeline whose ``batch_fn`` adds :meth:`jaxkd.lm.topk_cache.TopKCache.read` of the batch's
     indices.

   Target: **cached/scratch epoch <= 1.10**.

Settings (``--quick``: tiny, for the smoke test; ``--gpu``: about 335M -> 60M parameters)::

  setting  teacher -> student             vocab   length  batch  memory at (vocab, length, batch)  chunks        k
  cpu      teacher (4x256) -> student     8192    128     16     32768, 512, 8                     32, 64, 128   32
  gpu      gpu_teacher -> gpu_student     32768   1024    8      32768, 1024, 8                    64, 128, 256  32
  quick    tiny -> tiny                   256     16      4      the timed size                    8             8

Run (11 minutes on 2 CPU cores at load average 8-10 from other jobs)::

  python -m benchmarks.lm_step
  python -m benchmarks.lm_step --rounds 5 --no_torch
  python -m benchmarks.lm_step --gpu                  # bfloat16 unless --dtype float32
  python -m benchmarks.lm_step --quick --out /tmp/bench

``--dtype bfloat16`` builds every JAX model with ``TransformerLM(dtype=bfloat16)`` (float32 params, logits and
losses) and runs PyTorch under ``torch.autocast(bfloat16)``. Writes ``<out>/lm_step.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import common
from benchmarks._lm_step_reference import (  # re-exported: the references the tables compare with
  ALPHA,
  LEARNING_RATE,
  WEIGHT_DECAY,
  hand_metrics,
  make_hand_step,
  torch_variant,
  xla_cost,
)
from benchmarks._lm_step_variants import (  # re-exported: the settings and variants of the tables
  SETTINGS,
  cache_variants,
  chunk_steps,
  chunk_variants,
  describe,
  make_models,
  memory_rows,
  optimizer,
  param_count,
  random_tokens,
  speed_variants,
  topk_batch,
)
from jaxkd.lm.transformer import TransformerLM

__all__ = [
  "ALPHA",
  "LEARNING_RATE",
  "SETTINGS",
  "WEIGHT_DECAY",
  "cache_variants",
  "chunk_steps",
  "chunk_variants",
  "hand_metrics",
  "main",
  "make_hand_step",
  "make_models",
  "memory_rows",
  "param_count",
  "random_tokens",
  "run",
  "speed_variants",
  "topk_batch",
  "torch_variant",
  "xla_cost",
]

# ---------------------------------------------------------------------------------------------------------------------
# The benchmark.


@dataclasses.dataclass
class Bench:
  """One run's setting, models and batch, shared by its three tables."""

  setting: str
  config: dict[str, Any]
  dtype: str
  compute_dtype: Any
  batch_size: int
  rounds: int
  block_s: float
  log: bool
  teacher: TransformerLM
  student: TransformerLM
  torch: Any
  description: str
  batch: dict[str, np.ndarray]
  teacher_variables: Any

  @property
  def vocab(self) -> int:
    return self.config["vocab"]

  @property
  def length(self) -> int:
    return self.config["length"]

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.length

  def interleave(self, variants: Sequence[common.Variant]) -> common.Timings:
    return common.interleave(variants, rounds=self.rounds, block_s=self.block_s, log=self.log)


def speed_table(bench: Bench) -> dict[str, Any]:
  """Table 1: tokens/s of jaxkd's step against the hand-written JAX step and PyTorch eager."""
  speed = speed_variants(
    bench.teacher,
    bench.student,
    bench.teacher_variables,
    bench.batch,
    torch=bench.torch,
    dtype=bench.compute_dtype,
    use_gpu=bench.setting == "gpu",
  )
  variants, host_us, costs = speed.variants, speed.host_us, speed.costs
  timings = bench.interleave(variants)
  wall, cpu = timings.wall, timings.cpu
  row: dict[str, Any] = {"batch": bench.batch_size, "length": bench.length, "vocab": bench.vocab}
  for variant in variants:
    row[f"{variant.name}_tokens_s"] = bench.tokens_per_step / statistics.median(wall[variant.name])
    if variant.name in host_us:
      row[f"{variant.name}_host_us"] = statistics.median(host_us[variant.name])
  for name in ("jaxkd", "jaxkd_noskip", "hand_metrics"):
    row[f"{name}_vs_hand"] = common.median_ratio(wall["hand"], wall[name])
    row[f"{name}_vs_hand_cpu"] = common.median_ratio(cpu["hand"], cpu[name])
  for name in ("jaxkd", "jaxkd_noskip"):
    if "torch" in wall:
      row[f"{name}_vs_torch"] = common.median_ratio(wall["torch"], wall[name])
      row[f"{name}_vs_torch_cpu"] = common.median_ratio(cpu["torch"], cpu[name])
  row["first_loss"] = speed.first_loss
  row["cost"] = costs
  names = ("jaxkd", "hand", "hand_metrics")
  row["gb_accessed"] = " / ".join(f"{costs[n]['gb_accessed']:.2f}" for n in names)
  row["gflop"] = " / ".join(f"{costs[n]['gflop']:.1f}" for n in names)
  row["seconds_per_step_rounds"] = {"wall": wall, "cpu": cpu}
  columns = ["batch", "jaxkd_tokens_s", "jaxkd_noskip_tokens_s", "hand_tokens_s", "jaxkd_vs_hand"]
  columns += ["jaxkd_noskip_vs_hand", "jaxkd_vs_hand_cpu", "jaxkd_noskip_vs_hand_cpu"]
  columns += ["hand_metrics_tokens_s", "hand_metrics_vs_hand", "hand_metrics_vs_hand_cpu"]
  if bench.torch is not None:
    columns += ["torch_tokens_s", "jaxkd_vs_torch", "jaxkd_vs_torch_cpu"]
  columns += ["jaxkd_host_us", "hand_host_us", "gflop", "gb_accessed"]
  table = common.print_table(
    f"lm_step speed ({bench.description}; forward KL, alpha {ALPHA}; target jaxkd/hand >= 0.97; _cpu: by process "
    "CPU time; gflop, gb_accessed: XLA's counts for jaxkd / hand / hand_metrics)",
    [row],
    columns,
  )
  return {"rows": [row], "table": table, "hand_step": speed.hand_step}


def chunk_memory(bench: Bench, steps: dict, hand_step: Any) -> dict[str, dict]:
  """Memory of every step compiled at the setting's memory size (reusing the timed compilations when equal)."""
  mem_vocab, mem_length, mem_batch = bench.config["memory"]
  chunks, k = bench.config["chunks"], bench.config["k"]
  if (mem_vocab, mem_length, mem_batch) == (bench.vocab, bench.length, bench.batch_size):
    return memory_rows(steps, hand_step, bench.teacher, bench.student, batch=mem_batch, k=k)
  mem_teacher, mem_student = make_models(bench.setting, vocab=mem_vocab, length=mem_length, dtype=bench.compute_dtype)
  mem_hand = make_hand_step(mem_teacher, mem_student, optimizer(), ALPHA)
  mem_steps = chunk_steps(mem_teacher, chunks, k)
  return memory_rows(mem_steps, mem_hand, mem_teacher, mem_student, batch=mem_batch, k=k)


def chunk_table(bench: Bench, hand_step: Any) -> dict[str, Any]:
  """Table 2: dense against chunked against top-k steps, timed at this size and compiled at the memory size."""
  k = bench.config["k"]
  cached_batch = topk_batch(bench.teacher, bench.teacher_variables, bench.batch, k)
  steps = chunk_steps(bench.teacher, bench.config["chunks"], k)
  variants, first_loss, timed_memory = chunk_variants(
    steps, bench.student, bench.teacher_variables, bench.batch, cached_batch
  )
  timings = bench.interleave(variants)
  start = time.perf_counter()
  memory = chunk_memory(bench, steps, hand_step)
  memory_s = time.perf_counter() - start
  rows = []
  for name in [v.name for v in variants] + ["hand"]:
    row: dict[str, Any] = {"step": name}
    if name in timings.wall:
      row["step_ms"] = statistics.median(timings.wall[name]) * 1e3
      row["tokens_s"] = bench.tokens_per_step / statistics.median(timings.wall[name])
      row["speed_vs_dense"] = common.median_ratio(timings.wall["dense"], timings.wall[name])
      row["speed_vs_dense_cpu"] = common.median_ratio(timings.cpu["dense"], timings.cpu[name])
      row["timed_size_temp_mb"] = timed_memory[name].get("temp_mb")
      row["first_loss"] = first_loss[name]
    row.update(memory[name])
    if "total_mb" in memory[name] and "total_mb" in memory["dense"]:
      row["temp_vs_dense"] = memory[name]["temp_mb"] / memory["dense"]["temp_mb"]
      row["total_vs_dense"] = memory[name]["total_mb"] / memory["dense"]["total_mb"]
    rows.append(row)
  mem_vocab, mem_length, mem_batch = bench.config["memory"]
  table = common.print_table(
    f"lm_step chunking: time at vocab {bench.vocab}, length {bench.length}, batch {bench.batch_size}; memory "
    f"compiled at vocab {mem_vocab}, length {mem_length}, batch {mem_batch} (target chunked/dense total <= 0.25)",
    rows,
    ["step", "step_ms", "tokens_s", "speed_vs_dense", "speed_vs_dense_cpu", "timed_size_temp_mb"]
    + ["temp_mb", "total_mb", "temp_vs_dense", "total_vs_dense"],
  )
  return {"rows": rows, "table": table, "memory_s": memory_s, "topk_step": steps[f"topk{k}"][0]}


def cache_table(bench: Bench, topk_step: Any) -> dict[str, Any]:
  """Table 3: cached top-k epochs against scratch epochs, the cache read inside the timed epoch."""
  k = bench.config["k"]
  with tempfile.TemporaryDirectory() as cache_dir:
    variants, facts = cache_variants(
      bench.teacher,
      bench.student,
      bench.teacher_variables,
      num_sequences=bench.config["epoch_sequences"],
      length=bench.length,
      batch_size=bench.batch_size,
      k=k,
      cache_dir=cache_dir,
      topk_step=topk_step,  # the chunking table's, already compiled for these shapes
    )
    timings = bench.interleave(variants)
  rows = []
  for cached, scratch in (("cached_items", "scratch_items"), ("cached_batched", "scratch_batched")):
    cached_tokens_s = facts["steps_per_epoch"] * bench.tokens_per_step / statistics.median(timings.wall[cached])
    rows.append(
      {
        "reading": "grain per-item source" if cached == "cached_items" else "vectorised batch reads",
        "scratch_epoch_s": statistics.median(timings.wall[scratch]),
        "cached_epoch_s": statistics.median(timings.wall[cached]),
        "cached_over_scratch": common.median_ratio(timings.wall[cached], timings.wall[scratch]),
        "cached_over_scratch_cpu": common.median_ratio(timings.cpu[cached], timings.cpu[scratch]),
        "cached_tokens_s": cached_tokens_s,
        "seconds_rounds": {"wall": timings.wall, "cpu": timings.cpu},
      }
    )
  table = common.print_table(
    f"lm_step cache: epochs of {facts['steps_per_epoch']} steps, top-{k} cache "
    f"({facts['cache_bytes_per_token']:.0f} B/token, built in {facts['cache_build_s']:.1f} s) vs "
    "scratch (target cached/scratch <= 1.10)",
    rows,
    ["reading", "scratch_epoch_s", "cached_epoch_s", "cached_over_scratch", "cached_over_scratch_cpu"]
    + ["cached_tokens_s"],
  )
  return {"facts": facts, "rows": rows, "table": table}


def setup(setting: str, dtype: str | None, batch_size: int | None, rounds, block_s, with_torch: bool, log) -> Bench:
  """The setting's models, batch and teacher variables, and the PyTorch peer when asked for and installed."""
  config = SETTINGS[setting]
  dtype = dtype or ("bfloat16" if setting == "gpu" else "float32")
  compute_dtype = common.dtype_of(dtype)
  vocab, length = config["vocab"], config["length"]
  batch_size = batch_size or config["batch"]
  rounds = rounds or config["rounds"]
  block_s = config["block_s"] if block_s is None else block_s
  teacher, student = make_models(setting, vocab=vocab, length=length, dtype=compute_dtype)
  torch = common.import_torch("the PyTorch eager peer") if with_torch else None
  description = (
    f"TransformerLM {config['teacher']} {describe(teacher)} ({param_count(teacher) / 1e6:.1f}M) -> "
    f"{config['student']} {describe(student)} ({param_count(student) / 1e6:.1f}M), vocab {vocab}, length {length}, "
    f"batch {batch_size}, {dtype}"
  )
  print(
    f"lm_step: {description}, {jax.local_device_count()} local device(s), {common.cpu_cores()} cores, {rounds} rounds",
    flush=True,
  )
  batch = random_tokens(batch_size, length, vocab)
  teacher_variables = jax.jit(teacher.init)(jax.random.key(1), batch["tokens"][:1])
  return Bench(
    setting,
    config,
    dtype,
    compute_dtype,
    batch_size,
    rounds,
    block_s,
    log,
    teacher,
    student,
    torch,
    description,
    batch,
    teacher_variables,
  )


def run(
  *,
  setting: str = "cpu",
  dtype: str | None = None,
  batch_size: int | None = None,
  rounds: int | None = None,
  block_s: float | None = None,
  with_torch: bool = True,
  out_dir: str | None = None,
  log: bool = False,
) -> dict[str, Any]:
  """Runs the three tables, prints them and writes ``lm_step.json``.

  Args:
    setting: ``'cpu'``, ``'gpu'`` or ``'quick'`` (tiny, for the smoke test); see the module docstring.
    dtype: ``'float32'`` or ``'bfloat16'``, the models' computation dtype; default bfloat16 for ``'gpu'``.
    batch_size: sequences per step (default per setting).
    rounds: alternation rounds per table.
    block_s: seconds per timed block.
    with_torch: include the PyTorch peer when torch is installed.
    out_dir: where the JSON goes (``benchmarks/results`` by default).
    log: print every round's times.
  """
  bench = setup(setting, dtype, batch_size, rounds, block_s, with_torch, log)
  began = time.perf_counter()
  speed = speed_table(bench)
  print(f"[speed: {time.perf_counter() - began:.0f} s]", flush=True)
  began = time.perf_counter()
  chunking = chunk_table(bench, speed["hand_step"])
  print(
    f"[chunking: {time.perf_counter() - began:.0f} s, of which memory compiles {chunking['memory_s']:.0f} s]",
    flush=True,
  )
  began = time.perf_counter()
  cache = cache_table(bench, chunking["topk_step"])
  print(f"[cache: {time.perf_counter() - began:.0f} s]", flush=True)
  teacher, student, config = bench.teacher, bench.student, bench.config
  mem_vocab, mem_length, mem_batch = config["memory"]
  results = {
    "benchmark": "lm_step",
    "setting": setting,
    "models": bench.description,
    "teacher_params": param_count(teacher),
    "student_params": param_count(student),
    "dtype": bench.dtype,
    "vocab": bench.vocab,
    "length": bench.length,
    "batch_size": bench.batch_size,
    "alpha": ALPHA,
    "temperature": 1.0,
    "optimizer": f"adamw(lr={LEARNING_RATE}, weight_decay={WEIGHT_DECAY})",
    "k": config["k"],
    "chunks": list(config["chunks"]),
    "memory_size": {"vocab": mem_vocab, "length": mem_length, "batch": mem_batch},
    "memory_compile_s": chunking["memory_s"],
    "rounds": bench.rounds,
    "torch": None if bench.torch is None else bench.torch.__version__,
    "rows": speed["rows"],
    "table": speed["table"],
    "chunk_rows": chunking["rows"],
    "chunk_table": chunking["table"],
    "cache": cache["facts"],
    "cache_rows": cache["rows"],
    "cache_table": cache["table"],
    "environment": common.environment(),
  }
  common.write_results(out_dir, "lm_step", results)
  return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gpu", action="store_true", help="GPU sizes: gpu_teacher -> gpu_student, vocab 32768, L 1024")
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
  parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="default bfloat16 with --gpu")
  parser.add_argument("--batch_size", type=int, default=None, help="sequences per step")
  parser.add_argument("--rounds", type=int, default=None, help="alternation rounds per table")
  parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
  parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch peer")
  parser.add_argument("--log", action="store_true", help="print every round's times")


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_arguments(parser)
  args = parser.parse_args(argv)
  run(
    setting="quick" if args.quick else "gpu" if args.gpu else "cpu",
    dtype=args.dtype,
    batch_size=args.batch_size,
    rounds=args.rounds,
    with_torch=not args.no_torch,
    out_dir=args.out,
    log=args.log,
  )


if __name__ == "__main__":
  main()
