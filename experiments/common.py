"""The face of the experiments' shared machinery: command line, config checks, sub-runs, tables, plots, model costs.

Every experiment module defines ``get_config()`` and ``run(config, workdir)``, and ends
with ``if __name__ == "__main__": common.main(get_config, run)``, which gives it the
command line ``python -m experiments.NAME --workdir DIR [--config.KEY=VALUE ...]``.
``run`` starts with :func:`check_config`, so a bad value stops it before anything trains.

The parts live in private modules, one concern each; experiments use them only through this face:
:mod:`experiments._cli` (command line, config rules), :mod:`experiments._stats` (mean ± std, paired differences,
tables), :mod:`experiments._plots`, :mod:`experiments._measures` (FLOPs and latency of a forward pass),
:mod:`experiments._splits` (image data splits), :mod:`experiments._resume` (fingerprinted, resumable sub-runs) and
:mod:`experiments._subrun` (the image classifiers' :class:`SubRun`). JSON, digests and atomic writes are
:mod:`jaxkd.artifacts`'.
"""

from __future__ import annotations

from experiments._cli import (
  BOOL,
  DATA_KEYS,
  DATA_RULES,
  DROPOUT,
  FRACTION,
  NAME,
  NON_NEGATIVE,
  NON_NEGATIVE_INT,
  PLACEMENT,
  POSITIVE,
  POSITIVE_INT,
  SUBSET,
  ConfigError,
  Rule,
  check_config,
  main,
  one_of,
  resolve_quick,
  sequence_of,
  subconfig,
)
from experiments._measures import inference_latency, xla_forward_flops
from experiments._plots import plot_bars, plot_lines
from experiments._resume import (
  INPUTS_FILE,
  RESULT_FILE,
  canonical,
  fingerprint,
  finished_or_set_aside,
  read_dict,
  resumable,
  set_aside,
  write_json,
)
from experiments._splits import load_splits, pixel_stats
from experiments._stats import markdown_table, mean_std, paired_difference
from experiments._subrun import SubRun, evaluate, learning_curve, load_subrun_variables, train_subrun
from jaxkd.artifacts import read_json

__all__ = [
  "BOOL",
  "DATA_KEYS",
  "DATA_RULES",
  "DROPOUT",
  "FRACTION",
  "INPUTS_FILE",
  "NAME",
  "NON_NEGATIVE",
  "NON_NEGATIVE_INT",
  "PLACEMENT",
  "POSITIVE",
  "POSITIVE_INT",
  "RESULT_FILE",
  "SUBSET",
  "ConfigError",
  "Rule",
  "SubRun",
  "canonical",
  "check_config",
  "evaluate",
  "fingerprint",
  "finished_or_set_aside",
  "inference_latency",
  "learning_curve",
  "load_splits",
  "load_subrun_variables",
  "main",
  "markdown_table",
  "mean_std",
  "one_of",
  "paired_difference",
  "pixel_stats",
  "plot_bars",
  "plot_lines",
  "read_dict",
  "read_json",
  "resolve_quick",
  "resumable",
  "sequence_of",
  "set_aside",
  "subconfig",
  "train_subrun",
  "write_json",
  "xla_forward_flops",
]
