"""A teacher split over a model axis against a replicated one, and the sampler with and without its KV cache.

Two tables, each timed in one run with the variants in alternation (:mod:`benchmarks.common`):

1. **sharded**: tokens/s of the live-teacher LM KD step (``lm_objective('forward', alpha=0.5)``, adamw) on the
   same devices, the same global batch and the same models, placed three ways: ``replicated``
   (``Placement.data_parallel()``: every device holds the whole teacher and student) and ``model<m>``
   (``Placement.sharded(m)``: a ``(devices/m, m)`` mesh, teacher and student state split over the model axis by the
   FSDP default of :mod:`jaxkd.sharding`), plus ``model<M>_bf16`` (the widest split with the teacher held in
   bfloat16). Per variant: the teacher's bytes held per device (its arrays' shards) and the compiled step's bytes
   per device (``memory_analysis()``: arguments, temporaries, total = argument + output - alias + temp).
2. **sampler**: sequences/s of :func:`jaxkd.lm.transformer.sample` (KV cache, one compiled ``lax.scan``) against
   :func:`jaxkd.lm.transformer.sample_uncached` (the full forward pass per new token), greedy, on the student.

On a CPU the "devices" are XLA's host-platform fakes sharing the same cores: the sharded step does the same
arithmetic plus the gathers of split weights, so its speed here measures the overhead of those collectives, not
a gain; the memory columns are what a real accelerator would hold. ``python -m benchmarks.sharded`` asks XLA for 4
CPU devices when it starts JAX itself (``XLA_FLAGS``); with fewer devices the model splits that do not divide
the device count are skipped. Settings (``--quick`` for the smoke test, ``--gpu`` for an accelerator)::

  setting  teacher -> student      vocab  length  batch  sampler: batch, prompt + new tokens
  cpu      teacher -> student      2048   64      16     8, 16 + 48
  gpu      gpu_teacher -> gpu_student  32768  512     16     32, 64 + 192
  quick    tiny -> tiny            64     16      8      4, 4 + 8
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:  # only when this module starts JAX: 4 fake CPU devices for the mesh
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import argparse  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxkd  # noqa: E402
from benchmarks import common  # noqa: E402
from jaxkd import lm  # noqa: E402
from jaxkd.lm import transformer
from jaxkd.placement import Placement  # noqa: E402

SETTINGS = {
  "cpu": dict(teacher="teacher", student="student", vocab=2048, length=64, batch=16, sample=(8, 16, 48)),
  "gpu": dict(teacher="gpu_teacher", student="gpu_student", vocab=32768, length=512, batch=16, sample=(32, 64, 192)),
  "quick": dict(teacher="tiny", student="tiny", vocab=64, length=16, batch=8, sample=(4, 4, 8)),
}


def _models(config: dict) -> tuple[transformer.TransformerLM, transformer.TransformerLM]:
  def make(size: str) -> transformer.TransformerLM:
    return transformer.TransformerLM(
      **transformer.lm_config(size, vocab_size=config["vocab"], max_len=config["length"])
    )

  return make(config["teacher"]), make(config["student"])


def _batch(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, config["vocab"], (config["batch"], config["length"] + 1)).astype(np.int32)
  return {"tokens": tokens[:, :-1], "label": tokens[:, 1:]}


def _bytes_per_device(tree: Any) -> int:
  return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def _step_variant(name: str, step: Any, state: Any, teacher: Any, batch: dict) -> common.Variant:
  holder = {"state": state}

  def run(n: int) -> None:
    metrics = None
    for _ in range(n):
      holder["state"], metrics = step(holder["state"], teacher, batch)
    jax.block_until_ready(metrics)

  return common.Variant(name, run, warmup=2)


def sharded_rows(config: dict, *, rounds: int, block_s: float, log: bool = False) -> list[dict[str, Any]]:
  teacher_module, student_module = _models(config)
  example = np.zeros((2, config["length"]), np.int32)
  teacher_variables = jax.device_get(jax.jit(teacher_module.init)(jax.random.key(1), example))
  host_state = jax.device_get(
    jaxkd.create_train_state(lm.lm_model(student_module), optax.adamw(1e-3), {"tokens": example}, rng=0)
  )
  devices = jax.device_count()
  splits = [m for m in (2, 4, 8) if m <= devices and devices % m == 0]
  placements: dict[str, tuple[Placement, Any]] = {"replicated": (Placement.data_parallel(), None)}
  placements.update({f"model{m}": (Placement.sharded(m), None) for m in splits})
  if splits:
    placements[f"model{splits[-1]}_bf16"] = (Placement.sharded(splits[-1]), jnp.bfloat16)
  batch = _batch(config)
  objective = lm.lm_objective("forward", alpha=0.5)
  variants, rows = [], []
  for name, (placement, dtype) in placements.items():
    step = jaxkd.make_train_step(
      teacher_apply_fn=lm.lm_model(teacher_module, name="teacher"), objective=objective, placement=placement
    )
    state, teacher = placement.put(host_state), placement.put(teacher_variables, dtype=dtype)
    placed = placement.put_batch(batch)
    memory = step.lower(state, teacher, placed).compile().memory_analysis()
    rows.append(
      {
        "placement": name,
        "mesh": "x".join(str(s) for s in placement.mesh.devices.shape),
        "teacher_mb_per_device": _bytes_per_device(teacher) / 2**20,
        "state_mb_per_device": _bytes_per_device(state) / 2**20,
        "argument_mb": memory.argument_size_in_bytes / 2**20,
        "temp_mb": memory.temp_size_in_bytes / 2**20,
        "total_mb": (
          memory.argument_size_in_bytes
          + memory.output_size_in_bytes
          - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes
        )
        / 2**20,
      }
    )
    variants.append(_step_variant(name, step, state, teacher, placed))
  timings = common.interleave(variants, rounds=rounds, block_s=block_s, log=log)
  tokens = config["batch"] * config["length"]
  for row in rows:
    wall = timings.wall[row["placement"]]
    row["tokens_per_s"] = tokens / float(np.median(wall))
    row["vs_replicated"] = common.median_ratio(timings.wall["replicated"], wall)
  return rows


def sampler_rows(config: dict, *, rounds: int, block_s: float, log: bool = False) -> list[dict[str, Any]]:
  batch, prompt_len, new = config["sample"]
  module = transformer.TransformerLM(
    **transformer.lm_config(config["student"], vocab_size=config["vocab"], max_len=prompt_len + new)
  )
  prompt = np.random.default_rng(0).integers(0, config["vocab"], (batch, prompt_len)).astype(np.int32)
  params = jax.jit(module.init)(jax.random.key(0), prompt)["params"]
  kwargs = dict(max_new_tokens=new, rng=jax.random.key(1), greedy=True)
  samplers = {"kv_cache": transformer.sample, "no_cache": transformer.sample_uncached}
  same = np.array_equal(
    np.asarray(samplers["kv_cache"](module, params, prompt, **kwargs)),
    np.asarray(samplers["no_cache"](module, params, prompt, **kwargs)),
  )

  def variant(name: str) -> common.Variant:
    def run(n: int) -> None:
      out = None
      for _ in range(n):
        out = samplers[name](module, params, prompt, **kwargs)
      jax.block_until_ready(out)

    return common.Variant(name, run, warmup=1)

  timings = common.interleave([variant(n) for n in samplers], rounds=rounds, block_s=block_s, log=log)
  return [
    {
      "sampler": name,
      "sequences_per_s": batch / float(np.median(timings.wall[name])),
      "new_tokens_per_s": batch * new / float(np.median(timings.wall[name])),
      "vs_no_cache": common.median_ratio(timings.wall["no_cache"], timings.wall[name]),
      "same_tokens": same,
    }
    for name in samplers
  ]


def run(
  *, setting: str = "cpu", rounds: int | None = None, out_dir: str | None = None, log: bool = False
) -> dict[str, Any]:
  config = SETTINGS[setting]
  rounds = rounds or (2 if setting == "quick" else 5)
  block_s = 0.01 if setting == "quick" else 0.3
  sharded = sharded_rows(config, rounds=rounds, block_s=block_s, log=log)
  sampler = sampler_rows(config, rounds=rounds, block_s=block_s, log=log)
  table = common.print_table(
    f"sharded teacher ({config['teacher']} -> {config['student']}, vocab {config['vocab']}, "
    f"{config['batch']} x {config['length']} tokens, {jax.device_count()} {jax.default_backend()} devices)",
    sharded,
    [
      "placement",
      "mesh",
      "tokens_per_s",
      "vs_replicated",
      "teacher_mb_per_device",
      "state_mb_per_device",
      "argument_mb",
      "temp_mb",
      "total_mb",
    ],
  )
  sampler_table = common.print_table(
    f"sampler ({config['student']}, batch {config['sample'][0]}, {config['sample'][1]} + {config['sample'][2]} "
    "tokens, greedy)",
    sampler,
    ["sampler", "sequences_per_s", "new_tokens_per_s", "vs_no_cache", "same_tokens"],
  )
  results = {
    "benchmark": "sharded",
    "environment": common.environment(setting=setting, rounds=rounds),
    "config": config,
    "rows": sharded,
    "table": table,
    "sampler_rows": sampler,
    "sampler_table": sampler_table,
  }
  common.write_results(out_dir, "sharded", results)
  return results


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
  group.add_argument("--gpu", action="store_true", help="accelerator sizes")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
  parser.add_argument("--log", action="store_true")
  args = parser.parse_args(argv)
  run(
    setting="quick" if args.quick else "gpu" if args.gpu else "cpu", rounds=args.rounds, out_dir=args.out, log=args.log
  )


if __name__ == "__main__":
  main()
