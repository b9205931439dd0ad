"""lm_distill's report: ``results.json``, ``results.md`` and ``topk.png`` from a table of the runs so far.

Each piece is a small function of the per-variant summary (mean ± std over seeds), so the report of a partial run
(the seeds done) is written the same way as the final one.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import common
from experiments._lm_data import Data, cached_reference, equal_time_references, topk_tail


def summarize(done: Mapping[str, list[dict]]) -> dict[str, dict]:
  """Per variant: mean ± std over seeds of bits/byte, agreement, wall seconds and seconds per step."""
  return {
    name: {
      "test_bits_per_byte": common.mean_std(r["test_bits_per_byte"] for r in results),
      "test_agreement": common.mean_std(r["test_agreement"] for r in results),
      "wall_seconds": common.mean_std(r["wall_seconds"] for r in results),
      "seconds_per_step": common.mean_std(r["seconds_per_step"] or math.nan for r in results),
      "num_steps": results[0]["num_steps"],
    }
    for name, results in done.items()
  }


def param_counts(module: Any, context: int) -> dict[str, int]:
  """Parameters with and without the (tied) token embedding, from shapes alone."""
  from jaxkd.models import count_params

  shapes = jax.eval_shape(module.init, jax.random.key(0), np.zeros((1, context), np.int32))
  total = count_params(shapes["params"])
  embedding = module.vocab_size * module.d_model
  return {"params": total, "params_without_embedding": total - embedding}


def labels(config: ml_collections.ConfigDict, names: Any) -> dict[str, str]:
  """The table's name of each variant."""
  out = {
    "scratch": "scratch",
    "dense_kd": f"dense KD (forward KL, alpha {config.alpha:g}, T {config.temperature:g})",
    "reverse_kl": "reverse KL, live teacher",
    "gjsd": f"GJSD (beta {config.gjsd_beta:g}), live teacher",
    "scratch_equal_time": "scratch at dense KD's wall time",
    "scratch_cached_time": f"scratch at the top-{cached_reference(config).removeprefix('topk_k')} run's wall time",
  }
  for name in names:
    if name.startswith("topk_k"):
      k = int(name.removeprefix("topk_k"))
      out[name] = f"top-{k} cache ({topk_tail(k, config)})"
  return out


def table_rows(config, teacher_result, summary, names: Mapping[str, str], bytes_column) -> list[dict]:
  """The teacher's row, then one per variant (mean ± std over seeds)."""
  rows = [
    {
      "model": f"teacher ({config.teacher_size})",
      "steps": teacher_result["num_steps"],
      "test bits/byte": teacher_result["test_bits_per_byte"],
      "agreement": "",
      "wall s": teacher_result["wall_seconds"],
      "s/step": teacher_result["seconds_per_step"] or math.nan,
      "teacher bytes/token": "",
    }
  ]
  for name, stats in summary.items():
    rows.append(
      {
        "model": names[name],
        "steps": stats["num_steps"],
        "test bits/byte": stats["test_bits_per_byte"],
        "agreement": stats["test_agreement"],
        "wall s": stats["wall_seconds"],
        "s/step": stats["seconds_per_step"],
        "teacher bytes/token": bytes_column.get(name, ""),
      }
    )
  return rows


def comparisons(summary: Mapping[str, dict], teacher_result: Mapping[str, Any]) -> dict[str, dict]:
  """Each variant's gain over scratch in bits/byte, against the seed spread and the scratch-teacher gap."""
  out = {}
  scratch = summary["scratch"]["test_bits_per_byte"] if "scratch" in summary else None
  for name in summary:
    if name == "scratch" or scratch is None:
      continue
    stats = summary[name]["test_bits_per_byte"]
    gain = scratch["mean"] - stats["mean"]
    spread = max(scratch["std"], stats["std"])
    teacher_gap = scratch["mean"] - teacher_result["test_bits_per_byte"]
    out[name] = {
      "gain_over_scratch": gain,
      "seed_spread": spread if stats["n"] > 1 else None,
      "beats_scratch_beyond_spread": bool(gain > spread) if stats["n"] > 1 else None,
      "gap_closed": gain / teacher_gap if teacher_gap > 0 else None,
    }
  return out


def cached_ks(summary: Mapping[str, dict]) -> list[int]:
  return sorted(int(n.removeprefix("topk_k")) for n in summary if n.startswith("topk_k"))


def topk_vs_dense(config: ml_collections.ConfigDict, summary: Mapping[str, dict]) -> dict | None:
  """The reference top-k run against dense KD: the difference in % and the share of dense KD's gain it keeps."""
  if not cached_ks(summary) or "dense_kd" not in summary:
    return None
  k = int(cached_reference(config).removeprefix("topk_k"))
  bpb = {name: stats["test_bits_per_byte"]["mean"] for name, stats in summary.items()}
  dense, top = bpb["dense_kd"], bpb[f"topk_k{k}"]
  gain = bpb["scratch"] - dense
  return {
    "k": k,
    "difference_percent": 100 * (top - dense) / dense,
    # Only meaningful when dense KD gained something over scratch.
    "share_of_dense_gain": (bpb["scratch"] - top) / gain if gain > 0 else None,
  }


def setting_lines(config, data: Data, params, ratio, done) -> list[str]:
  """What was measured: the corpus, tokenizer, models and seeds."""
  corpus, vocab = data.info["corpus"], data.vocab_size
  return [
    "Bits per byte: lower is better; gains below are scratch's bits/byte minus the variant's (positive: better).",
    f"Corpus: {config.corpus_root or 'the standard library'} ({corpus['files']['train']} training files, "
    f"{corpus['bytes']['train']} bytes; fingerprint {corpus['fingerprint'][:12]}); "
    f"byte-level BPE of {vocab} tokens (fingerprint {data.info['tokenizer']['fingerprint'][:12]}); context "
    f"{config.context}; test split {corpus['bytes']['test']} bytes, {data.info['tokens']['test']} tokens, "
    "every target scored.",
    f"Teacher ({config.teacher_size}): {params['teacher']['params']:,} parameters "
    f"({params['teacher']['params_without_embedding']:,} without the embedding); student ({config.student_size}): "
    f"{params['student']['params']:,} ({params['student']['params_without_embedding']:,}); the student is "
    f"{ratio['params']:.1f}x smaller ({ratio['params_without_embedding']:.1f}x without embeddings).",
    f"Seeds: {len(next(iter(done.values())))} of {len(config.seeds)} ({tuple(config.seeds)}), the same init and "
    "data order for every variant of a seed; mean ± std over seeds.",
  ]


def comparison_lines(compared: Mapping[str, dict], versus_dense: dict | None) -> list[str]:
  """A line per variant against scratch, and the top-k cache against dense KD."""
  lines = []
  for name, c in compared.items():
    if c["beats_scratch_beyond_spread"] is None:
      verdict = "one seed: no spread to compare with"
    else:
      verdict = (
        f"{'more' if c['beats_scratch_beyond_spread'] else 'NOT more'} than the seed spread {c['seed_spread']:.4f}"
      )
    gap = f"; {c['gap_closed']:.0%} of the scratch-teacher gap" if c["gap_closed"] is not None else ""
    lines.append(f"- {name}: {c['gain_over_scratch']:+.4f} bits/byte below scratch ({verdict}{gap}).")
  if versus_dense is not None:
    share = versus_dense["share_of_dense_gain"]
    lines.append(
      f"Top-{versus_dense['k']} cache vs dense KD: {versus_dense['difference_percent']:+.2f}% bits/byte"
      + (
        f"; it keeps {share:.0%} of dense KD's gain over scratch."
        if share is not None
        else " (dense KD did not beat scratch)."
      )
    )
  return lines


def equal_time_lines(config, summary, names: Mapping[str, str], equal_time_steps: Mapping[str, int]) -> list[str]:
  """How many scratch steps fit in the other runs' time, the step-cost ratios, and the equal-time verdicts."""
  if not equal_time_steps or "scratch" not in summary:
    return []
  sps = {name: summary[name]["seconds_per_step"]["mean"] for name in summary}
  cached = [sps[n] / sps["scratch"] for n in summary if n.startswith("topk_k")]
  fits = "; ".join(
    f"{steps} scratch steps fit in {names.get(reference, reference)}'s {config.student_steps}"
    for name, steps in equal_time_steps.items()
    for reference in [equal_time_references(config)[name]]
  )
  lines = [
    f"Equal time: {fits} (by seed {config.seeds[0]}'s steady step times); over all seeds a dense-KD step took "
    f"{sps['dense_kd'] / sps['scratch']:.2f}x a scratch step"
    + (f" and a cached step {min(cached):.2f}-{max(cached):.2f}x." if cached else ".")
  ]
  for name, reference in equal_time_references(config).items():
    if name in summary and reference in summary:
      ours, theirs = summary[name]["test_bits_per_byte"], summary[reference]["test_bits_per_byte"]
      difference = ours["mean"] - theirs["mean"]
      spread = max(ours["std"], theirs["std"])
      lines.append(
        f"At equal wall time, {names[reference]} is {abs(difference):.4f} bits/byte "
        f"{'below' if difference > 0 else 'above'} {names[name]} "
        f"({'more' if abs(difference) > spread else 'NOT more'} than the seed spread {spread:.4f})."
      )
  return lines


def cache_lines(cache: Mapping[str, Any] | None, vocab: int) -> list[str]:
  """The cache's size on disk against dense logits, its write time and the teacher's mass in its top k."""
  if cache is None:
    return []
  formula = cache["formula_bytes_per_token"][str(cache["k"])]
  mass = ", ".join(f"k={k}: {m:.2f}" for k, m in cache["teacher_topk_mass"].items())
  return [
    f"Cache: k = {cache['k']} over the {cache['num_windows']} training windows the students see "
    f"({cache['num_tokens']} tokens): {cache['file_bytes'] / 1e6:.1f} MB on disk, "
    f"{cache['file_bytes_per_token']:.1f} bytes/token (the formula's {formula}); dense float32 logits would take "
    f"{4 * vocab} bytes/token. Written in {cache['write_seconds']:.0f} s. The teacher's mean probability in its "
    f"top k: {mass}."
  ]


def plot_topk(workdir: pathlib.Path, config: ml_collections.ConfigDict, summary: Mapping[str, dict]) -> None:
  """``topk.png``: bits/byte against k, with dense KD, scratch and the equal-time arms as lines."""
  ks = cached_ks(summary)
  if not ks:
    return

  def bpb(name):
    return summary[name]["test_bits_per_byte"]["mean"]

  hlines = {"dense KD": bpb("dense_kd"), "scratch": bpb("scratch")}
  if "scratch_equal_time" in summary:
    hlines["scratch, dense KD's time"] = bpb("scratch_equal_time")
  if "scratch_cached_time" in summary:
    hlines["scratch, cached run's time"] = bpb("scratch_cached_time")
  common.plot_lines(
    workdir / "topk.png",
    {f"top-k cache ({config.tail}{'; k=1: bucket' if 1 in ks else ''})": (ks, [bpb(f"topk_k{k}") for k in ks])},
    xlabel="k (teacher tokens kept per position)",
    ylabel="test bits per byte",
    title=f"{config.student_size} student from a {config.teacher_size} teacher",
    logx=True,
    hlines=hlines,
  )


def write_report(
  workdir: pathlib.Path,
  config: ml_collections.ConfigDict,
  data: Data,
  models: Mapping[str, Any],
  teacher_result: Mapping[str, Any],
  runs: Mapping[str, list[dict]],
  cache_info: Callable[[], dict],
  equal_time_steps: Mapping[str, int],
) -> dict:
  """``results.json``, ``results.md`` and ``topk.png`` from the runs so far (variants of the seeds done).

  ``models`` holds the ``'teacher'`` and ``'student'`` modules, whose parameters are counted.
  """
  vocab = data.vocab_size
  done = {name: results for name, results in runs.items() if results}
  summary = summarize(done)
  params = {role: param_counts(models[role], config.context) for role in ("teacher", "student")}
  ratio = {key: params["teacher"][key] / params["student"][key] for key in params["teacher"]}
  cache = cache_info() if any(name.startswith("topk_k") for name in done) else None
  bytes_column = {"dense_kd": 4 * vocab, "reverse_kl": 4 * vocab, "gjsd": 4 * vocab}
  if cache is not None:
    bytes_column |= {f"topk_k{k}": size for k, size in cache["formula_bytes_per_token"].items()}
  names = labels(config, summary)
  rows = table_rows(config, teacher_result, summary, names, bytes_column)
  compared, versus_dense = comparisons(summary, teacher_result), topk_vs_dense(config, summary)
  lines = [
    *setting_lines(config, data, params, ratio, done),
    *comparison_lines(compared, versus_dense),
    *equal_time_lines(config, summary, names, equal_time_steps),
    *cache_lines(cache, vocab),
  ]
  text_md = "# lm_distill\n\n" + common.markdown_table(rows) + "\n" + "\n".join(lines) + "\n"
  (workdir / "results.md").write_text(text_md)
  plot_topk(workdir, config, summary)
  results = {
    "config": config.to_dict(),
    **data.info,
    "params": params,
    "param_ratio": ratio,
    "teacher": dict(teacher_result),
    "runs": {name: list(results) for name, results in done.items()},
    "summary": summary,
    "comparisons": compared,
    "topk_vs_dense": versus_dense,
    "equal_time_steps": equal_time_steps,
    "cache": cache,
    "dense_bytes_per_token": 4 * vocab,
    "rows": rows,
  }
  common.write_json(workdir / "results.json", results)
  print(text_md, flush=True)
  return results
