"""On-policy distillation (GKD) against supervised and sequence-level KD, on multi-digit addition.

A task where exposure bias shows and answers are checked exactly: ``a+b=`` with ``digits``-digit operands
(zero-padded, so every prompt has the same length) and the sum written least significant digit first (the order a
small transformer can learn carries in), then an end-of-sequence token. A transformer teacher learns it from
scratch; students about 8x smaller learn it for ``student_steps`` steps in every arm:

* ``scratch``: cross-entropy on the data's answers (the baseline without a teacher);
* ``supervised_kd``: forward KL to the teacher on the data's answers (``lam = 0``, GKD's supervised KD);
* ``seq_kd``: forward KL on the teacher's own greedy answers (sequence-level KD, Kim and Rush 2016);
* ``gkd_l<lam>_b<beta>``: GKD (Agarwal et al. 2024): a ``lam`` fraction of the steps train on the student's own
  sampled answers (temperature 1), the rest on the data's, all with the generalised JSD(``beta``).

Every KD arm is pure distillation (``alpha = 1``; the teacher scores every answer token in the step). The report:
exact-match accuracy of greedy answers on held-out problems, held-out bits per answer character (teacher-forced on
the true answers), mean ± std over seeds, the paired difference of each arm to supervised KD over seeds
(:func:`experiments.common.paired_difference`), the number of seeds that learned the task (``learned``), and each
arm's seconds per step, generation included, against supervised KD's (the extra compute of generating), timed
with every arm in alternation after the sub-runs (:func:`step_costs`). ``results.md``, ``results.json`` and
``on_policy.png`` hold them.

Run (the README's table; measured time in the README)::

  python -m experiments.on_policy --workdir workdir/on_policy

Quick (a smoke test of the pipeline, tiny models and steps)::

  python -m experiments.on_policy --workdir workdir/on_policy_quick --config.quick=True

Each sub-run (the teacher, each arm and seed) writes ``result.json`` when it finishes and is reused when rerun with
the same inputs; one of other inputs is moved aside and trained again. A killed run repeats only the sub-run it
was in (under two minutes each at the default sizes).
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import common

# Characters 0-9 are tokens 0-9.
PLUS, EQUALS, EOS, PAD = 10, 11, 12, 13
VOCAB = 16
# A student that has learned to carry gets most answers right; one stuck on the plateau before it gets about 10%.
LEARNED = 0.5

RULES = {
  "digits": common.POSITIVE_INT,
  "train_size": common.POSITIVE_INT,
  "test_size": common.POSITIVE_INT,
  "batch_size": common.POSITIVE_INT,
  "teacher_layers": common.POSITIVE_INT,
  "teacher_width": common.POSITIVE_INT,
  "teacher_heads": common.POSITIVE_INT,
  "teacher_steps": common.POSITIVE_INT,
  "teacher_lr": common.POSITIVE,
  "student_layers": common.POSITIVE_INT,
  "student_width": common.POSITIVE_INT,
  "student_heads": common.POSITIVE_INT,
  "student_steps": common.POSITIVE_INT,
  "student_lr": common.POSITIVE,
  "lams": common.sequence_of(common.FRACTION),
  "betas": common.sequence_of(common.Rule("a number in (0, 1)", lambda v: common.NON_NEGATIVE.test(v) and 0 < v < 1)),
  "sample_temperature": common.NON_NEGATIVE,
  "seeds": common.sequence_of(common.NON_NEGATIVE_INT),
  "cost_rounds": common.POSITIVE_INT,
  "cost_block": common.POSITIVE_INT,
  "arms": common.sequence_of(common.one_of(("scratch", "supervised_kd", "seq_kd", "gkd"))),
}


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.digits = 3
  config.train_size = 20000
  config.test_size = 1000
  config.batch_size = 64
  config.teacher_layers = 4
  config.teacher_width = 128
  config.teacher_heads = 4
  config.teacher_steps = 3000
  config.teacher_lr = 1e-3
  config.student_layers = 2
  config.student_width = 64
  config.student_heads = 2
  config.student_steps = 2000
  config.student_lr = 2e-3
  config.lams = (0.5, 1.0)
  config.betas = (0.1, 0.5, 0.9)
  config.sample_temperature = 1.0
  config.seeds = (0, 1, 2)
  # The step cost: every arm timed in alternation, cost_rounds rounds of cost_block steps (step_costs).
  config.cost_rounds = 5
  config.cost_block = 20
  config.arms = ("scratch", "supervised_kd", "seq_kd", "gkd")  # "gkd": every (lam, beta) of lams x betas
  config.quick = False
  config.quick_overrides = ml_collections.ConfigDict(
    {
      "digits": 2,
      "train_size": 500,
      "test_size": 64,
      "batch_size": 16,
      "teacher_layers": 1,
      "teacher_width": 32,
      "teacher_heads": 2,
      "teacher_steps": 40,
      "student_layers": 1,
      "student_width": 16,
      "student_heads": 2,
      "student_steps": 12,
      "lams": (1.0,),
      "betas": (0.5,),
      "seeds": (0, 1),
      "cost_rounds": 2,
      "cost_block": 2,
    }
  )
  return config


# ---------------------------------------------------------------- the task


def problems(n: int, digits: int, *, seed: int) -> dict[str, np.ndarray]:
  """``n`` addition problems: ``prompt`` ``[n, 2 digits + 2]`` and ``completion`` / ``completion_mask``
  ``[n, digits + 2]`` (the reversed sum, EOS, then padding)."""
  rng = np.random.default_rng(seed)
  a, b = rng.integers(0, 10**digits, n), rng.integers(0, 10**digits, n)

  def digits_of(x: np.ndarray, count: int) -> np.ndarray:  # most significant first
    return np.stack([(x // 10 ** (count - 1 - i)) % 10 for i in range(count)], axis=1)

  prompt = np.concatenate(
    [digits_of(a, digits), np.full((n, 1), PLUS), digits_of(b, digits), np.full((n, 1), EQUALS)], axis=1
  )
  total = a + b
  width = digits + 1
  reversed_sum = digits_of(total, width)[:, ::-1]
  lengths = np.array([len(str(t)) for t in total])
  completion = np.full((n, width + 1), PAD)
  mask = np.zeros((n, width + 1), bool)
  for i, length in enumerate(lengths):
    completion[i, :length] = reversed_sum[i, :length]
    completion[i, length] = EOS
    mask[i, : length + 1] = True
  return {"prompt": prompt.astype(np.int32), "completion": completion.astype(np.int32), "completion_mask": mask}


def split(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """Training and held-out problems; held-out prompts that also occur in training are dropped."""
  train = problems(config.train_size, config.digits, seed=1000)
  test = problems(config.test_size, config.digits, seed=2000)
  seen = {p.tobytes() for p in train["prompt"]}
  fresh = np.array([p.tobytes() not in seen for p in test["prompt"]])
  return train, {k: v[fresh] for k, v in test.items()}


def _module(config: ml_collections.ConfigDict, role: str):
  from jaxkd.lm.transformer import TransformerLM

  return TransformerLM(
    vocab_size=VOCAB,
    num_layers=config[f"{role}_layers"],
    d_model=config[f"{role}_width"],
    num_heads=config[f"{role}_heads"],
    max_len=3 * config.digits + 4,
  )


def evaluate(module: Any, params: Any, test: dict, *, chunk: int = 500) -> dict[str, float]:
  """Exact match of greedy answers (digits and EOS) and teacher-forced bits per answer character."""
  from jaxkd.lm import on_policy, transformer

  new = test["completion"].shape[1]
  correct, bits, count = [], 0.0, 0
  for start in range(0, len(test["prompt"]), chunk):
    rows = {k: v[start : start + chunk] for k, v in test.items()}
    generated = transformer.sample(
      module, params, rows["prompt"], max_new_tokens=new, rng=jax.random.key(0), greedy=True
    )
    answer = np.asarray(generated)[:, rows["prompt"].shape[1] :]
    keep = rows["completion_mask"]
    correct.append(np.all((answer == rows["completion"]) | ~keep, axis=1))
    batch = on_policy.token_batch(rows["prompt"], rows["completion"], keep, pad_id=PAD)
    logits = module.apply({"params": params}, batch["tokens"])
    log_probs = jax.nn.log_softmax(logits.astype(np.float32), axis=-1)
    picked = np.take_along_axis(np.asarray(log_probs), batch["label"][..., None], axis=-1)[..., 0]
    bits += float(-(picked * batch["mask"]).sum() / np.log(2))
    count += int(batch["mask"].sum())
  return {"exact_match": float(np.concatenate(correct).mean()), "bits_per_char": bits / count}


# ---------------------------------------------------------------- the sub-runs


def arms(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """Every arm's settings: where its answers come from and the loss."""
  fixed = {
    "scratch": dict(lam=0.0, source="student", kind=None, beta=None),
    "supervised_kd": dict(lam=0.0, source="student", kind="forward", beta=None),
    "seq_kd": dict(lam=1.0, source="teacher", kind="forward", beta=None),
  }
  table = {name: arm for name, arm in fixed.items() if name in config.arms}
  if "gkd" in config.arms:
    for lam in config.lams:
      for beta in config.betas:
        table[f"gkd_l{lam:g}_b{beta:g}"] = dict(lam=float(lam), source="student", kind="gjsd", beta=float(beta))
  return table


def _setup(
  config: ml_collections.ConfigDict,
  role: str,
  train: dict,
  *,
  seed: int,
  arm: dict | None,
  teacher: tuple[Any, Any] | None,
) -> tuple[Any, Any, Any, Any]:
  """``(module, state, step_fn, completions)`` of one arm: a fresh model, its compiled step and its batches."""
  import optax

  import jaxkd
  from jaxkd import lm
  from jaxkd.lm import on_policy

  module = _module(config, role)
  steps, lr = config[f"{role}_steps"], config[f"{role}_lr"]
  example = {"tokens": np.zeros((2, train["prompt"].shape[1] + train["completion"].shape[1] - 1), np.int32)}
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps)
  state = jaxkd.create_train_state(lm.lm_model(module), optax.adamw(schedule), example, rng=seed)
  uses_teacher = arm is not None and arm["kind"] is not None
  teacher_module = teacher[0] if teacher is not None else None
  objective = lm.lm_objective(arm["kind"], alpha=1.0, beta=arm["beta"] or 0.5) if uses_teacher else None
  step_fn = jaxkd.make_train_step(
    teacher_apply_fn=lm.lm_model(teacher_module, name="teacher") if uses_teacher else None,
    objective=objective,
    placement="single",
  )
  completions = on_policy.Completions(
    module,
    teacher_module,
    lam=arm["lam"] if arm else 0.0,
    source=arm["source"] if arm else "student",
    max_new_tokens=train["completion"].shape[1],
    # Sequence-level KD trains on the teacher's greedy answers (Kim and Rush's beam of one); GKD samples.
    temperature=0.0 if arm and arm["source"] == "teacher" else config.sample_temperature,
    eos_id=EOS,
    pad_id=PAD,
    seed=seed,
  )
  return module, state, step_fn, completions


def _one_step(config, train, order, arm_fns, state, teacher_variables, step: int) -> tuple[Any, Any, bool]:
  """One training step of an arm on a random batch: its answers (generated or the data's), then the update."""
  step_fn, completions = arm_fns
  rows = order.integers(0, len(train["prompt"]), config.batch_size)
  batch, generated = completions(
    {k: v[rows] for k, v in train.items()},
    step=step,
    student_params=state.params,
    teacher_params=teacher_variables["params"] if teacher_variables is not None else None,
  )
  state, metrics = step_fn(state, teacher_variables, batch)
  jax.block_until_ready(metrics["loss"])
  return state, metrics, generated


def _train(
  config: ml_collections.ConfigDict,
  role: str,
  train: dict,
  *,
  seed: int,
  arm: dict | None,
  teacher: tuple[Any, Any] | None,
) -> tuple[Any, dict[str, float]]:
  module, state, step_fn, completions = _setup(config, role, train, seed=seed, arm=arm, teacher=teacher)
  steps = config[f"{role}_steps"]
  teacher_variables = teacher[1] if teacher is not None else None
  order = np.random.default_rng(seed)
  generated_steps, step_seconds = 0, []
  for i in range(steps):
    start = time.perf_counter()
    state, metrics, generated = _one_step(config, train, order, (step_fn, completions), state, teacher_variables, i)
    if i >= 2:  # the first steps compile
      step_seconds.append(time.perf_counter() - start)
    generated_steps += generated
    if (i + 1) % max(1, steps // 5) == 0:
      print(f"  {role} step {i + 1}/{steps}: loss {float(metrics['loss']):.4f}", flush=True)
  stats = {
    "seconds_per_step": float(np.mean(step_seconds)) if step_seconds else float("nan"),
    "generated_fraction": generated_steps / steps,
    "final_loss": float(metrics["loss"]),
  }
  return (module, jax.device_get(state.params)), stats


def step_costs(
  config: ml_collections.ConfigDict, train: dict, teacher: tuple[Any, Any], table: dict[str, dict]
) -> dict[str, dict[str, float]]:
  """Seconds per step of every arm, the batch's generation included, and its ratio to supervised KD's.

  The arms run in alternation, ``cost_rounds`` rounds of ``cost_block`` steps each (the order rotated every round),
  in one process, so a change of load between rounds cancels out of the ratios (the median of the per-round
  ratios). The sub-runs' own step times are not comparable: they ran one after another, beside other jobs.
  """
  names = list(table)
  setups = {name: _setup(config, "student", train, seed=0, arm=table[name], teacher=teacher) for name in names}
  states = {name: setups[name][1] for name in names}
  teacher_variables = teacher[1]
  order = np.random.default_rng(0)
  step_counter = 0

  def block(name: str) -> float:
    nonlocal step_counter
    _, _, step_fn, completions = setups[name]
    start = time.perf_counter()
    for _ in range(config.cost_block):
      states[name], _, _ = _one_step(
        config, train, order, (step_fn, completions), states[name], teacher_variables, step_counter
      )
      step_counter += 1
    return (time.perf_counter() - start) / config.cost_block

  for name in names:  # compile the step and the sampler before timing
    block(name)
  seconds: dict[str, list[float]] = {name: [] for name in names}
  for round_index in range(config.cost_rounds):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      seconds[name].append(block(name))
  reference = np.asarray(seconds["supervised_kd"])
  return {
    name: {
      "seconds_per_step": float(np.median(seconds[name])),
      "vs_supervised_kd": float(np.median(np.asarray(seconds[name]) / reference)),
    }
    for name in names
  }


def _subrun(workdir: pathlib.Path, name: str, inputs: dict, work) -> dict:
  """``work(run_dir)``'s result, timed and recorded, or a finished one of the same inputs (common.resumable)."""

  def timed(run_dir: pathlib.Path) -> dict:
    start = time.perf_counter()
    result = work(run_dir)
    result["wall_seconds"] = time.perf_counter() - start
    print(f"{name}: {result}", flush=True)
    return result

  return common.resumable(workdir, name, inputs, timed)


def _teacher(config, workdir, train, test) -> tuple[Any, Any, dict]:
  from flax import serialization

  keys = ("digits", "train_size", "batch_size", *(k for k in RULES if k.startswith("teacher_")))
  inputs = {k: config[k] for k in keys}

  def work(run_dir: pathlib.Path) -> dict:
    (module, params), stats = _train(config, "teacher", train, seed=0, arm=None, teacher=None)
    (run_dir / "params.msgpack").write_bytes(serialization.msgpack_serialize(params))
    return {**evaluate(module, params, test), **stats, "params": int(sum(x.size for x in jax.tree.leaves(params)))}

  result = _subrun(workdir, "teacher", inputs, work)
  module = _module(config, "teacher")
  params = serialization.msgpack_restore((workdir / "teacher" / "params.msgpack").read_bytes())
  return module, {"params": params}, result


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  common.check_config(config, RULES)
  if "supervised_kd" not in config.arms:
    raise common.ConfigError(f"arms={tuple(config.arms)} must include 'supervised_kd': every arm is compared with it.")
  train, test = split(config)
  print(f"addition of {config.digits}-digit numbers: {len(train['prompt'])} training, {len(test['prompt'])} held out")
  teacher_module, teacher_variables, teacher_result = _teacher(config, workdir, train, test)
  print(f"teacher: exact match {teacher_result['exact_match']:.4f}", flush=True)
  student_keys = ("digits", "train_size", "batch_size", "sample_temperature", *(k for k in RULES if "student_" in k))
  per_arm: dict[str, list[dict]] = {}
  for name, arm in arms(config).items():
    for seed in config.seeds:
      inputs = {
        **{k: config[k] for k in student_keys},
        "arm": arm,
        "seed": seed,
        "teacher": teacher_result["fingerprint"],
      }

      def work(run_dir: pathlib.Path, arm=arm, seed=seed) -> dict:
        (module, params), stats = _train(
          config, "student", train, seed=seed, arm=arm, teacher=(teacher_module, teacher_variables)
        )
        return {**evaluate(module, params, test), **stats, "params": int(sum(x.size for x in jax.tree.leaves(params)))}

      per_arm.setdefault(name, []).append(_subrun(workdir, f"{name}/seed{seed}", inputs, work))
  print("timing every arm's step in alternation", flush=True)
  costs = step_costs(config, train, (teacher_module, teacher_variables), arms(config))
  return report(config, workdir, teacher_result, per_arm, costs)


def report(config: ml_collections.ConfigDict, workdir: pathlib.Path, teacher: dict, per_arm: dict, costs: dict) -> dict:
  reference = per_arm["supervised_kd"]
  rows = [
    {
      "arm": "teacher",
      "exact_match": teacher["exact_match"],
      "bits_per_char": teacher["bits_per_char"],
      "params": teacher["params"],
    }
  ]
  summary = {}
  for name, runs in per_arm.items():
    exact = common.mean_std(r["exact_match"] for r in runs)
    bits = common.mean_std(r["bits_per_char"] for r in runs)
    paired = common.paired_difference([r["exact_match"] for r in runs], [r["exact_match"] for r in reference])
    cost = costs[name]["vs_supervised_kd"]
    summary[name] = {"exact_match": exact, "bits_per_char": bits, "vs_supervised_kd": paired, "step_cost": cost}
    rows.append(
      {
        "arm": name,
        "exact_match": exact,
        "bits_per_char": bits,
        "learned": f"{sum(r['exact_match'] >= LEARNED for r in runs)}/{len(runs)}",
        "vs_supervised_kd": "" if name == "supervised_kd" else _paired(paired),
        "step_cost_vs_supervised": cost,
        "params": runs[0]["params"],
      }
    )
  table = common.markdown_table(
    rows, ["arm", "exact_match", "bits_per_char", "learned", "vs_supervised_kd", "step_cost_vs_supervised", "params"]
  )
  gkd = {name: s for name, s in summary.items() if name.startswith("gkd")}
  best = max(gkd, key=lambda name: gkd[name]["exact_match"]["mean"]) if gkd else None
  lines = [
    f"{config.digits}-digit addition, {config.train_size} training problems, {len(config.seeds)} seeds, "
    f"{config.student_steps} student steps at batch {config.batch_size}. exact_match: greedy answers on held-out "
    f"problems; bits_per_char: teacher-forced on the true answers; learned: seeds at {LEARNED:.0%} exact match or "
    "more (a student either learns carrying or stays near 10%); vs_supervised_kd: paired by seed, exact-match "
    "points; step_cost: seconds per step (generation included) over supervised KD's, timed in alternation "
    f"({config.cost_rounds} rounds of {config.cost_block} steps; median of the per-round ratios).",
  ]
  if best is not None:
    verdict = gkd[best]["vs_supervised_kd"]["verdict"] or "one seed: no spread"
    lines.append(
      f"Best GKD arm {best}: {100 * gkd[best]['vs_supervised_kd']['mean']:+.2f} points of exact match over "
      f"supervised KD ({verdict}); GKD above supervised KD in "
      f"{sum(s['vs_supervised_kd']['mean'] > 0 for s in gkd.values())} of {len(gkd)} (lam, beta) settings."
    )
  text = table + "\n" + "\n".join(lines) + "\n"
  (workdir / "results.md").write_text("# on_policy\n\n" + text)
  results = {
    "config": config.to_dict(),
    "teacher": teacher,
    "arms": summary,
    "runs": per_arm,
    "step_costs": costs,
    "rows": rows,
  }
  common.write_json(workdir / "results.json", results)
  common.plot_bars(
    workdir / "on_policy.png",
    {name: s["exact_match"]["mean"] for name, s in summary.items()},
    errors={name: s["exact_match"]["std"] for name, s in summary.items()},
    hlines={"teacher": teacher["exact_match"]},
    ylabel="held-out exact match",
    title=f"{config.digits}-digit addition: on-policy distillation",
  )
  print(text, flush=True)
  return results


def _paired(paired: dict) -> str:
  cell = f"{100 * paired['mean']:+.2f} ± {100 * paired['std']:.2f}"
  return f"{cell} ({paired['verdict']})" if paired["verdict"] else cell


if __name__ == "__main__":
  common.main(get_config, run)
