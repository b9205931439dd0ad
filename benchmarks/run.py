"""Runs every benchmark: train step (MLP and ResNet pairs), input pipeline and LM step, their tables, JSON results.

About 2.5 minutes on 2 quiet CPU cores (6 under heavy load) without ``lm_step``, which adds 11 minutes at load 8-10
(not yet timed on a quiet machine); ``--quick`` runs tiny sizes (the smoke test)::

  python -m benchmarks.run                                   # everything, CPU sizes, benchmarks/results/*.json
  python -m benchmarks.run --quick --out /tmp/bench          # smoke
  python -m benchmarks.run --gpu --dtype bfloat16            # GPU sizes in bfloat16
  python -m benchmarks.run --only train_step_mlp --sizes 64,256 --rounds 11
  python -m benchmarks.run --only lm_step --rounds 5          # the language-model step alone
  python -m benchmarks.sharded                                # sharded teacher and sampler on 4 fake CPU devices

PyTorch is optional (``pip install -e '.[bench]'``); without it the PyTorch comparison is skipped with a note.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import common, lm_step, pipeline, sharded, train_step

BENCHMARKS = ("train_step_mlp", "train_step_resnet", "pipeline", "lm_step", "sharded")


def run_all(
  *,
  setting: str = "cpu",
  only: Sequence[str] = BENCHMARKS,
  dtype: str = "float32",
  sizes: Sequence[int] | None = None,
  conv_sizes: Sequence[int] | None = None,
  rounds: int | None = None,
  placement: str = "pmap",
  with_torch: bool = True,
  out_dir: str | None = None,
  log: bool = False,
) -> dict[str, dict[str, Any]]:
  """Runs the selected benchmarks in this process and returns their results by name."""
  unknown = sorted(set(only) - set(BENCHMARKS))
  if unknown:
    raise ValueError(f"unknown benchmarks {unknown}; choose from {BENCHMARKS}.")
  quick = setting == "quick"
  step_rounds = rounds or (2 if quick else 7)
  block_s = 0.01 if quick else 0.3
  results = {}
  start = time.perf_counter()
  for name in BENCHMARKS:
    if name not in only:
      continue
    began = time.perf_counter()
    if name.startswith("train_step_"):
      pair = name.removeprefix("train_step_")
      results[name] = train_step.run(
        pair,
        sizes=sizes if pair == "mlp" else conv_sizes,
        dtype=dtype,
        setting=setting,
        rounds=step_rounds if pair == "mlp" else rounds or (2 if quick else 5),
        block_s=block_s,
        with_torch=with_torch,
        out_dir=out_dir,
        log=log,
      )
    elif name == "lm_step":
      # dtype as given (unlike `python -m benchmarks.lm_step --gpu`, which defaults to bfloat16).
      results[name] = lm_step.run(
        setting=setting, dtype=dtype, rounds=rounds, with_torch=with_torch, out_dir=out_dir, log=log
      )
    elif name == "sharded":
      # Model splits need several devices: under benchmarks.run only those XLA_FLAGS gave (see benchmarks.sharded).
      results[name] = sharded.run(setting=setting, rounds=rounds, out_dir=out_dir, log=log)
    else:
      results[name] = pipeline.run(
        setting=setting, placement=placement, dtype=dtype, rounds=rounds, out_dir=out_dir, log=log
      )
    print(f"[{name}: {time.perf_counter() - began:.0f} s]", flush=True)
  print(f"\nall benchmarks: {time.perf_counter() - start:.0f} s", flush=True)
  return results


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {BENCHMARKS}")
  parser.add_argument("--sizes", type=common.parse_sizes, default=None, help="MLP batch sizes, e.g. 32,128,512")
  parser.add_argument("--conv_sizes", type=common.parse_sizes, default=None, help="ResNet batch sizes")
  parser.add_argument(
    "--placement", default="pmap", choices=("pmap", "single", "data_parallel"), help="the pipeline benchmark's step"
  )
  train_step.add_arguments(parser)
  args = parser.parse_args(argv)
  run_all(
    setting=train_step.setting_of(args),
    only=[s.strip() for s in args.only.split(",") if s.strip()],
    dtype=args.dtype,
    sizes=args.sizes,
    conv_sizes=args.conv_sizes,
    rounds=args.rounds,
    placement=args.placement,
    with_torch=not args.no_torch,
    out_dir=args.out,
    log=args.log,
  )


if __name__ == "__main__":
  main()
