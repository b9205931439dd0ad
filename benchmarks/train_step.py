"""Train-step speed: jaxkd against the same step written by hand in JAX + optax, and against PyTorch eager.

For each batch size, in alternation (see :mod:`benchmarks.common`):

* ``jaxkd_pmap``: ``jaxkd.make_train_step(placement='pmap')`` called as a user calls it, ``step(state,
  teacher_variables, batch)``, host-side input checks included; state and teacher put with
  ``step.placement.put``, the batch already placed on the devices as :class:`jaxkd.data.DevicePrefetcher` places
  it (``step.placement.put_batch``).
* ``jaxkd_single``: the same with ``placement='single'`` (a one-device mesh: ``jit`` + ``shard_map``).
* ``jaxkd_noskip``: ``jaxkd_single`` built with ``skip_nonfinite=False``: no gradient norm and no skipped update
  on a non-finite step, the work the hand-written step does.
* ``hand``: the same work written by hand: teacher forward under ``stop_gradient``, student forward and
  backward, ``alpha * T^2 KL + (1 - alpha) CE``, ``optax.adam``, one ``jax.jit`` with the state donated.
* ``torch`` (MLP pair only, when torch is installed): the same step in PyTorch eager, loss written as
  torchdistill and mdistiller write it, ``torch.optim.Adam``, ``torch.set_num_threads(cores JAX uses)``.
* ``matmul``: a large square ``jnp.dot`` in the same dtype, the reference rate for the fraction of peak.

Model FLOPs per step: ``F(teacher) + 3 F(student)``, where ``F`` is one inference forward pass counted from the
layer shapes (:func:`benchmarks.common.layer_matmul_flops`: ``2 * output_elements * kernel_fan_in`` summed over
Dense and Conv layers) and the student's backward pass counts as two forward passes (input and weight
gradients). ``fraction_of_matmul = flops_per_step * steps_per_s / matmul_flops_per_s``.

Pairs: ``mlp`` (teacher 784-1200-1200-10, student 784-800-800-10, Hinton et al. 2015) on 28x28x1 inputs;
``resnet`` (CIFAR-style :class:`jaxkd.models.ResNet` pair) on 32x32x3 random inputs.

Run (about 1 minute per pair on 2 CPU cores)::

  python -m benchmarks.train_step --pair mlp
  python -m benchmarks.train_step --pair resnet
  python -m benchmarks.train_step --pair mlp --gpu --dtype bfloat16       # larger default sizes for a GPU
  python -m benchmarks.train_step --pair mlp --sizes 64,256 --rounds 9

Writes ``<out>/train_step_<pair>.json``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from jaxkd.models import MLP, ResNet
from jaxkd.state import create_train_state
from jaxkd.train import make_train_step

TEMPERATURE = 4.0
ALPHA = 0.9
LEARNING_RATE = 1e-3
# (column name, placement, skip_nonfinite) of the jaxkd steps timed against the hand-written one.
JAXKD_VARIANTS = (("jaxkd_pmap", "pmap", True), ("jaxkd_single", "single", True), ("jaxkd_noskip", "single", False))
NUM_CLASSES = 10

# batch sizes and matmul size per setting; --sizes / --matmul_size override them.
DEFAULTS = {
  ("mlp", "cpu"): {"sizes": (32, 128, 512), "matmul": 2048},
  ("resnet", "cpu"): {"sizes": (16, 64), "matmul": 2048},
  ("mlp", "gpu"): {"sizes": (256, 1024, 8192), "matmul": 8192},
  ("resnet", "gpu"): {"sizes": (64, 256, 1024), "matmul": 8192},
  ("mlp", "quick"): {"sizes": (8,), "matmul": 64},
  ("resnet", "quick"): {"sizes": (4,), "matmul": 64},
}


def make_pair(pair: str, *, setting: str, dtype: Any) -> tuple[nn.Module, nn.Module, tuple[int, ...], str]:
  """``(teacher, student, image_shape, description)`` of a named pair."""
  if pair == "mlp":
    hidden = {"quick": ((16, 16), (8, 8))}.get(setting, ((1200, 1200), (800, 800)))
    teacher, student = MLP(hidden[0], dtype=dtype), MLP(hidden[1], dtype=dtype)
    shape = (28, 28, 1)
    description = f"MLP 784-{'-'.join(map(str, hidden[0]))}-10 -> 784-{'-'.join(map(str, hidden[1]))}-10"
    return teacher, student, shape, description
  if pair == "resnet":
    if setting == "gpu":  # RepDistiller's resnet32x4 -> resnet8x4
      teacher = ResNet(stage_sizes=(5, 5, 5), widths=(64, 128, 256), stem_width=32, dtype=dtype)
      student = ResNet(stage_sizes=(1, 1, 1), widths=(64, 128, 256), stem_width=32, dtype=dtype)
    elif setting == "quick":  # stem conv + BatchNorm + head only: the conv and BatchNorm paths, compiled fast
      teacher = ResNet(stage_sizes=(), widths=(), stem_width=8, dtype=dtype)
      student = ResNet(stage_sizes=(), widths=(), stem_width=4, dtype=dtype)
    else:  # sized for a CPU (under a minute on 2 cores): resnet8 at twice the widths -> resnet8
      teacher = ResNet(stage_sizes=(1, 1, 1), widths=(32, 64, 128), stem_width=32, dtype=dtype)
      student = ResNet(stage_sizes=(1, 1, 1), widths=(16, 32, 64), stem_width=16, dtype=dtype)
    shape = (32, 32, 3)
    description = (
      f"ResNet stages {tuple(teacher.stage_sizes)} widths {tuple(teacher.widths)} -> "
      f"stages {tuple(student.stage_sizes)} widths {tuple(student.widths)}"
    )
    return teacher, student, shape, description
  raise ValueError(f"pair must be 'mlp' or 'resnet', got {pair!r}.")


# ---------------------------------------------------------------------------------------------------------------------
# The hand-written step.


def make_hand_step(teacher: nn.Module, student: nn.Module, tx: optax.GradientTransformation):
  """The distillation step written directly in JAX + optax: what jaxkd's step should cost no more than."""

  def loss_fn(params, batch_stats, teacher_variables, images, labels):
    teacher_logits = jax.lax.stop_gradient(teacher.apply(teacher_variables, images, train=False))
    if batch_stats:
      logits, updates = student.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
      )
      batch_stats = updates["batch_stats"]
    else:
      logits = student.apply({"params": params}, images, train=True)
    teacher_log_probs = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / TEMPERATURE)
    student_log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / TEMPERATURE)
    kd = TEMPERATURE**2 * jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), labels[:, None], axis=-1)[:, 0]
    return jnp.mean(ALPHA * kd + (1.0 - ALPHA) * ce), batch_stats

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, opt_state, batch_stats, teacher_variables, images, labels):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch_stats, teacher_variables, images, labels
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, batch_stats, loss

  return step


# ---------------------------------------------------------------------------------------------------------------------
# PyTorch peer (MLP only).


def _torch_mlp(torch: Any, sizes: Sequence[int]) -> Any:
  layers: list[Any] = [torch.nn.Flatten()]
  for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1], strict=True):
    layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
  layers.append(torch.nn.Linear(sizes[-2], sizes[-1]))
  return torch.nn.Sequential(*layers)


def torch_variant(
  torch: Any, teacher: MLP, student: MLP, images: np.ndarray, labels: np.ndarray, *, dtype: Any, use_gpu: bool
) -> common.Variant:
  """The step as torchdistill/mdistiller write it, eager, on the CPU threads JAX uses (or the GPU)."""
  import torch.nn.functional as F  # noqa: N812

  device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
  if device == "cpu":
    torch.set_num_threads(common.cpu_cores())
  fan_in = int(np.prod(images.shape[1:]))
  torch.manual_seed(0)
  t_model = _torch_mlp(torch, (fan_in, *teacher.hidden_sizes, NUM_CLASSES)).to(device).eval()
  s_model = _torch_mlp(torch, (fan_in, *student.hidden_sizes, NUM_CLASSES)).to(device).train()
  optimizer = torch.optim.Adam(s_model.parameters(), lr=LEARNING_RATE)
  x = torch.from_numpy(images).to(device)
  y = torch.from_numpy(labels.astype(np.int64)).to(device)
  autocast_dtype = torch.bfloat16 if dtype == jnp.bfloat16 else None
  t = TEMPERATURE

  def one_step() -> Any:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
      with torch.no_grad():
        teacher_logits = t_model(x)
      logits = s_model(x)
    logits, teacher_logits = logits.float(), teacher_logits.float()
    kd = F.kl_div(F.log_softmax(logits / t, dim=1), F.softmax(teacher_logits / t, dim=1), reduction="batchmean")
    loss = ALPHA * kd * t * t + (1.0 - ALPHA) * F.cross_entropy(logits, y)
    loss.backward()
    optimizer.step()
    return loss

  def run(n: int) -> None:
    for _ in range(n):
      one_step()
    if device == "cuda":
      torch.cuda.synchronize()

  return common.Variant("torch", run)


# ---------------------------------------------------------------------------------------------------------------------
# One batch size.


def build_variants(
  teacher: nn.Module,
  student: nn.Module,
  image_shape: tuple[int, ...],
  batch_size: int,
  *,
  torch: Any = None,
  dtype: Any = jnp.float32,
  use_gpu: bool = False,
) -> tuple[list[common.Variant], dict[str, float], dict[str, list[float]]]:
  """The variants for one batch size, the loss each reports after one step from the same initialisation, and
  where the JAX variants record their host time per step: the calling thread's CPU time in the dispatch loop
  (Python, input checks, jit dispatch), which load from other processes does not inflate."""
  data_rng = np.random.default_rng(0)
  images = data_rng.normal(size=(batch_size, *image_shape)).astype(np.float32)
  labels = data_rng.integers(0, NUM_CLASSES, size=batch_size).astype(np.int32)
  teacher_variables = common.host_variables(teacher, images[:1], seed=1)
  tx = optax.adam(LEARNING_RATE)
  flat_batch = {"image": images, "label": labels}
  first_loss: dict[str, float] = {}
  host_us: dict[str, list[float]] = {}
  variants = []

  for name, placement, skip_nonfinite in JAXKD_VARIANTS:
    step = make_train_step(
      teacher_apply_fn=teacher.apply,
      temperature=TEMPERATURE,
      alpha=ALPHA,
      placement=placement,
      skip_nonfinite=skip_nonfinite,
    )
    state = step.placement.put(create_train_state(student, tx, images[:1], rng=0))
    t_vars, batch = step.placement.put(teacher_variables), step.placement.put_batch(flat_batch)
    state, metrics = step(state, t_vars, batch)
    first_loss[name] = float(np.mean(metrics["loss"]))
    holder = {"state": state}
    host = host_us.setdefault(name, [])

    def run(n: int, step=step, t_vars=t_vars, batch=batch, holder=holder, host=host) -> None:
      start = time.thread_time()
      state = holder["state"]
      for _ in range(n):
        state, _ = step(state, t_vars, batch)
      host.append((time.thread_time() - start) / n * 1e6)
      holder["state"] = jax.block_until_ready(state)

    variants.append(common.Variant(name, run))

  hand_step = make_hand_step(teacher, student, tx)
  init_state = create_train_state(student, tx, images[:1], rng=0)  # same parameters as the jaxkd states
  params, batch_stats = init_state.params, init_state.batch_stats
  hand = {"params": params, "opt_state": tx.init(params), "batch_stats": batch_stats}
  t_vars, batch = jax.device_put(teacher_variables), jax.device_put(flat_batch)
  *new, loss = hand_step(hand["params"], hand["opt_state"], hand["batch_stats"], t_vars, batch["image"], batch["label"])
  hand.update(zip(("params", "opt_state", "batch_stats"), new, strict=True))
  first_loss["hand"] = float(loss)

  host = host_us.setdefault("hand", [])

  def run_hand(n: int) -> None:
    start = time.thread_time()
    params, opt_state, batch_stats = hand["params"], hand["opt_state"], hand["batch_stats"]
    for _ in range(n):
      params, opt_state, batch_stats, _ = hand_step(
        params, opt_state, batch_stats, t_vars, batch["image"], batch["label"]
      )
    host.append((time.thread_time() - start) / n * 1e6)
    hand.update(jax.block_until_ready({"params": params, "opt_state": opt_state, "batch_stats": batch_stats}))

  variants.append(common.Variant("hand", run_hand))
  if torch is not None and isinstance(teacher, MLP):
    variants.append(torch_variant(torch, teacher, student, images, labels, dtype=dtype, use_gpu=use_gpu))
  return variants, first_loss, host_us


def layer_flops_per_example(model: Any, image_shape: Sequence[int]) -> int:
  """:func:`benchmarks.common.layer_matmul_flops` of one example's inference forward pass, from shapes alone."""
  example = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), example)
  return common.layer_matmul_flops(model, variables, example)


def size_row(
  batch_size: int,
  variants: Sequence[common.Variant],
  timings: common.Timings,
  matmul_name: str,
  matmul_flops: float,
  flops_per_example: float,
  first_loss: dict[str, float],
  host_us: dict[str, list[float]],
) -> dict[str, Any]:
  """One batch size's row: steps/s, the fraction of the matmul rate, and the ratios to the hand-written step."""
  times, matmul_times, cpu_mm = timings.wall, timings.wall[matmul_name], timings.cpu[matmul_name]
  flops_per_step = flops_per_example * batch_size
  row: dict[str, Any] = {
    "batch": batch_size,
    "flops_per_step": flops_per_step,
    "matmul_gflops": matmul_flops / statistics.median(matmul_times) / 1e9,
  }
  for variant in variants:
    seconds = times[variant.name]
    row[f"{variant.name}_steps_s"] = 1.0 / statistics.median(seconds)
    # Per round against the matmul of the same round: the load of that moment cancels. The CPU-time version
    # compares core-seconds with core-seconds.
    for kind, per_step, per_matmul in (("", seconds, matmul_times), ("_cpu", timings.cpu[variant.name], cpu_mm)):
      row[f"{variant.name}_fraction_of_matmul{kind}"] = statistics.median(
        flops_per_step / s / (matmul_flops / m) for s, m in zip(per_step, per_matmul, strict=True)
      )
    if variant.name in host_us:
      row[f"{variant.name}_host_us"] = statistics.median(host_us[variant.name])
  for name, _, _ in JAXKD_VARIANTS:
    row[f"{name}_vs_hand"] = common.median_ratio(times["hand"], times[name])
    row[f"{name}_vs_hand_cpu"] = common.median_ratio(timings.cpu["hand"], timings.cpu[name])
    if "torch" in times:
      row[f"{name}_vs_torch"] = common.median_ratio(times["torch"], times[name])
      row[f"{name}_vs_torch_cpu"] = common.median_ratio(timings.cpu["torch"], timings.cpu[name])
  row["first_loss"] = first_loss
  row["first_loss_max_diff"] = max(abs(v - first_loss["hand"]) for v in first_loss.values())
  row["seconds_per_step_rounds"] = {"wall": timings.wall, "cpu": timings.cpu}
  return row


def table_columns(*, with_torch: bool) -> list[str]:
  """The printed table's columns (the JSON rows hold every field)."""
  columns = ["batch", "jaxkd_pmap_steps_s", "jaxkd_single_steps_s", "jaxkd_noskip_steps_s", "hand_steps_s"]
  columns += ["jaxkd_pmap_vs_hand", "jaxkd_single_vs_hand", "jaxkd_noskip_vs_hand"]
  columns += ["jaxkd_pmap_vs_hand_cpu", "jaxkd_single_vs_hand_cpu", "jaxkd_noskip_vs_hand_cpu"]
  if with_torch:
    columns += ["torch_steps_s", "jaxkd_pmap_vs_torch", "jaxkd_single_vs_torch", "jaxkd_pmap_vs_torch_cpu"]
  columns += ["matmul_gflops", "jaxkd_pmap_fraction_of_matmul", "hand_fraction_of_matmul"]
  columns += ["jaxkd_pmap_fraction_of_matmul_cpu", "jaxkd_pmap_host_us", "jaxkd_single_host_us", "hand_host_us"]
  return columns


def run(
  pair: str = "mlp",
  *,
  sizes: Sequence[int] | None = None,
  dtype: str = "float32",
  setting: str = "cpu",
  rounds: int = 7,
  block_s: float = 0.3,
  matmul_size: int | None = None,
  with_torch: bool = True,
  out_dir: str | None = None,
  log: bool = False,
) -> dict[str, Any]:
  """Runs the benchmark for one pair, prints its table and writes ``train_step_<pair>.json``.

  Args:
    pair: ``'mlp'`` or ``'resnet'``.
    sizes: batch sizes; defaults per pair and setting (``DEFAULTS``).
    dtype: ``'float32'`` or ``'bfloat16'``: the models' computation dtype and the matmul's (params stay float32).
    setting: ``'cpu'``, ``'gpu'`` (larger models and sizes) or ``'quick'`` (tiny, for the smoke test).
    rounds: alternation rounds per batch size.
    block_s: seconds per timed block.
    matmul_size: side of the reference square matmul.
    with_torch: include the PyTorch peer when torch is installed (MLP pair only).
    out_dir: where the JSON goes (``benchmarks/results`` by default).
    log: print every round's times.
  """
  compute_dtype = common.dtype_of(dtype)
  defaults = DEFAULTS[(pair, setting)]
  sizes = tuple(sizes or defaults["sizes"])
  matmul_size = matmul_size or defaults["matmul"]
  teacher, student, image_shape, description = make_pair(pair, setting=setting, dtype=compute_dtype)
  torch = None
  if with_torch and pair == "mlp":
    torch = common.import_torch("the PyTorch eager peer")
  elif with_torch:
    print(f"note: the PyTorch peer covers the MLP pair only; none for {pair!r}.")

  teacher_flops, student_flops = (layer_flops_per_example(m, image_shape) for m in (teacher, student))
  flops_per_example = teacher_flops + 3 * student_flops
  matmul, matmul_flops = common.matmul_variant(matmul_size, compute_dtype)
  print(
    f"train_step[{pair}]: {description}, {dtype}, batch sizes {sizes}, {jax.local_device_count()} local device(s), "
    f"{common.cpu_cores()} cores, {rounds} rounds",
    flush=True,
  )

  rows = []
  for batch_size in sizes:
    variants, first_loss, host_us = build_variants(
      teacher, student, image_shape, batch_size, torch=torch, dtype=compute_dtype, use_gpu=setting == "gpu"
    )
    timings = common.interleave([*variants, matmul], rounds=rounds, block_s=block_s, log=log)
    rows.append(
      size_row(batch_size, variants, timings, matmul.name, matmul_flops, flops_per_example, first_loss, host_us)
    )

  columns = table_columns(with_torch=torch is not None)
  title = f"train_step[{pair}] ({description}, {dtype}; target jaxkd/hand >= 0.97; _cpu: by process CPU time)"
  table = common.print_table(title, rows, columns)
  results = {
    "benchmark": f"train_step_{pair}",
    "pair": description,
    "dtype": dtype,
    "setting": setting,
    "temperature": TEMPERATURE,
    "alpha": ALPHA,
    "optimizer": f"adam(lr={LEARNING_RATE})",
    "rounds": rounds,
    "matmul_size": matmul_size,
    "flops_formula": "F(teacher) + 3 F(student); F = sum over Dense/Conv of 2 * output_elements * kernel_fan_in",
    "teacher_forward_flops_per_example": teacher_flops,
    "student_forward_flops_per_example": student_flops,
    "torch": None if torch is None else torch.__version__,
    "rows": rows,
    "table": table,
    "environment": common.environment(),
  }
  common.write_results(out_dir, f"train_step_{pair}", results)
  return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Flags shared with :mod:`benchmarks.run`."""
  parser.add_argument("--gpu", action="store_true", help="GPU-sized models and batch sizes")
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--rounds", type=int, default=None, help="alternation rounds")
  parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
  parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch peer")
  parser.add_argument("--log", action="store_true", help="print every round's times")


def setting_of(args: argparse.Namespace) -> str:
  return "quick" if args.quick else "gpu" if args.gpu else "cpu"


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--pair", default="mlp", choices=("mlp", "resnet"))
  parser.add_argument("--sizes", type=common.parse_sizes, default=None, help="batch sizes, e.g. 32,128,512")
  parser.add_argument("--matmul_size", type=int, default=None)
  add_arguments(parser)
  args = parser.parse_args(argv)
  setting = setting_of(args)
  run(
    args.pair,
    sizes=args.sizes,
    dtype=args.dtype,
    setting=setting,
    rounds=args.rounds or (2 if setting == "quick" else 7),
    block_s=0.01 if setting == "quick" else 0.3,
    matmul_size=args.matmul_size,
    with_torch=not args.no_torch,
    out_dir=args.out,
    log=args.log,
  )


if __name__ == "__main__":
  main()
