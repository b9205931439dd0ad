"""On-policy distillation (jaxkd.lm.on_policy): batches, masks, lam = 0 is supervised, determinism, resume, errors."""

import jax
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import lm
from jaxkd.lm import on_policy, transformer
from jaxkd.training.checkpoint import Checkpointer

VOCAB, PROMPT, NEW, BATCH, EOS = 32, 4, 6, 4, 1


def _module(layers=1):
  config = transformer.lm_config("tiny", vocab_size=VOCAB, max_len=PROMPT + NEW)
  config["num_layers"] = layers
  return transformer.TransformerLM(**config)


STUDENT, TEACHER = _module(), _module(layers=2)


@pytest.fixture(scope="module")
def models():
  tokens = np.zeros((2, PROMPT + NEW - 1), np.int32)
  teacher_variables = jax.device_get(jax.jit(TEACHER.init)(jax.random.key(1), tokens))
  state = jaxkd.create_train_state(lm.lm_model(STUDENT), optax.adam(1e-2), {"tokens": tokens}, rng=0)
  return teacher_variables, jax.device_get(state)


def _data(seed=0):
  rng = np.random.default_rng(seed)
  completion = rng.integers(2, VOCAB, (BATCH, NEW)).astype(np.int32)
  completion[0, 3] = EOS  # the first row ends early; what follows is padding
  return {"prompt": rng.integers(2, VOCAB, (BATCH, PROMPT)).astype(np.int32), "completion": completion}


def _step():
  return jaxkd.make_train_step(
    teacher_apply_fn=lm.lm_model(TEACHER, name="teacher"),
    objective=lm.lm_objective("gjsd", alpha=1.0, beta=0.5),
    placement="single",
    donate=False,
  )


def test_completion_mask_stops_after_the_first_eos():
  completion = np.array([[5, 1, 7, 1], [5, 6, 7, 8], [1, 2, 3, 4]])
  keep = on_policy.completion_mask(completion, eos_id=1)
  assert keep.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
  valid = np.array([[True] * 4, [True, True, False, False], [True] * 4])
  assert on_policy.completion_mask(completion, eos_id=1, valid=valid)[1].tolist() == [True, True, False, False]
  assert on_policy.completion_mask(completion, eos_id=None).all()


def test_token_batch_counts_the_kept_continuation_only():
  prompt, completion = np.array([[10, 11, 12]]), np.array([[20, 1, 22]])
  keep = on_policy.completion_mask(completion, eos_id=1)
  batch = on_policy.token_batch(prompt, completion, keep, pad_id=0)
  assert batch["tokens"].tolist() == [[10, 11, 12, 20, 1]]
  assert batch["label"].tolist() == [[11, 12, 20, 1, 0]]  # after the EOS: padding
  assert batch["mask"].tolist() == [[False, False, True, True, False]]  # the prompt is given, not learned


def test_lam_zero_is_the_supervised_token_step(models):
  teacher_variables, state = models
  data = _data()
  completions = on_policy.Completions(STUDENT, lam=0.0, max_new_tokens=NEW, eos_id=EOS)
  batch, generated = completions(data, step=0, student_params=state.params)
  assert not generated and not any(completions.generates(s) for s in range(50))
  supervised = on_policy.token_batch(
    data["prompt"], data["completion"], on_policy.completion_mask(data["completion"], eos_id=EOS), pad_id=EOS
  )
  jax.tree.map(np.testing.assert_array_equal, batch, supervised)
  step = _step()
  ours, _ = step(state, teacher_variables, batch)
  reference, _ = step(state, teacher_variables, supervised)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(ours.params), jax.device_get(reference.params))


def test_lam_one_trains_on_the_students_own_samples_deterministically(models):
  _, state = models
  data = _data()
  completions = on_policy.Completions(STUDENT, lam=1.0, max_new_tokens=NEW, eos_id=EOS, seed=3)
  batch, generated = completions(data, step=5, student_params=state.params)
  assert generated
  expected = transformer.sample(
    STUDENT, state.params, data["prompt"], max_new_tokens=NEW, rng=jax.random.fold_in(jax.random.key(3), 5)
  )
  continuation = np.asarray(expected)[:, PROMPT:]
  keep = on_policy.completion_mask(continuation, eos_id=EOS)
  np.testing.assert_array_equal(batch["mask"][:, PROMPT - 1 :], keep)
  np.testing.assert_array_equal(batch["label"][:, PROMPT - 1 :], np.where(keep, continuation, EOS))
  again, _ = completions(data, step=5, student_params=state.params)
  jax.tree.map(np.testing.assert_array_equal, batch, again)  # the same step draws the same continuations
  other, _ = completions(data, step=6, student_params=state.params)
  assert not np.array_equal(other["label"], batch["label"])


def test_sequence_level_kd_samples_the_teacher(models):
  teacher_variables, _ = models
  completions = on_policy.Completions(STUDENT, TEACHER, lam=1.0, source="teacher", max_new_tokens=NEW, temperature=0)
  batch, generated = completions(_data(), step=0, teacher_params=teacher_variables["params"])
  greedy = transformer.sample(
    TEACHER, teacher_variables["params"], _data()["prompt"], max_new_tokens=NEW, rng=jax.random.key(0), greedy=True
  )
  assert generated and batch["mask"][:, PROMPT - 1 :].all()  # no eos_id: the whole continuation counts
  np.testing.assert_array_equal(batch["label"][:, PROMPT - 1 :], np.asarray(greedy)[:, PROMPT:])


def test_lam_mixes_steps_in_proportion():
  completions = on_policy.Completions(STUDENT, lam=0.5, max_new_tokens=NEW)
  chosen = [completions.generates(s) for s in range(400)]
  assert 0.42 < np.mean(chosen) < 0.58
  assert chosen == [completions.generates(s) for s in range(400)]


def test_masked_positions_carry_no_loss_or_gradient(models):
  """Labels of the prompt and after the EOS never reach the loss: changing them changes no gradient."""
  teacher_variables, state = models
  batch, _ = on_policy.Completions(STUDENT, lam=0.0, max_new_tokens=NEW, eos_id=EOS)(_data(), step=0)
  changed = dict(batch, label=np.where(batch["mask"], batch["label"], (batch["label"] + 7) % VOCAB))
  step = _step()
  a, metrics_a = step(state, teacher_variables, batch)
  b, metrics_b = step(state, teacher_variables, changed)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.params), jax.device_get(b.params))
  assert float(metrics_a["loss"]) == float(metrics_b["loss"])


def test_resume_is_bit_exact_with_generation(models, tmp_path):
  teacher_variables, state = models
  completions = on_policy.Completions(STUDENT, lam=0.5, max_new_tokens=NEW, eos_id=EOS, seed=1)
  assert {completions.generates(s) for s in range(4)} == {True, False}  # both kinds of step below

  def train(state, steps, step_fn):
    for _ in range(steps):
      number = int(state.step)
      batch, _ = completions(_data(number), step=number, student_params=state.params)
      state, _ = step_fn(state, teacher_variables, batch)
    return state

  straight = train(state, 4, _step())
  half = train(state, 2, _step())
  checkpointer = Checkpointer(tmp_path / "ckpt")
  checkpointer.save(jax.device_get(half))
  checkpointer.wait_until_finished()
  restored = Checkpointer(tmp_path / "ckpt").restore(state)
  resumed = train(restored.state, 2, _step())  # a fresh step, as a restarted process builds
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), jax.device_get(straight.params))


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(lam=1.5), r"lam must be a number in \[0, 1\]"),
    (dict(source="oracle"), r"source must be one of \('student', 'teacher'\)"),
    (dict(source="teacher"), r"source='teacher' \(sequence-level KD\) needs the teacher module"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(temperature=-1.0), "temperature must be a number >= 0"),
    (dict(eos_id=VOCAB), r"eos_id must be None or a token id in \[0, 32\)"),
  ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    on_policy.Completions(STUDENT, **{"max_new_tokens": NEW, **kwargs})


def test_bad_batches_are_clear_errors(models):
  _, state = models
  completions = on_policy.Completions(STUDENT, lam=1.0, max_new_tokens=NEW)
  data = _data()
  long_prompt = dict(data, prompt=np.zeros((BATCH, PROMPT + 1), np.int32))
  with pytest.raises(ValueError, match=r"prompt length 5 \+ max_new_tokens 6 = 11 exceeds max_len=10"):
    completions(long_prompt, step=0, student_params=state.params)
  with pytest.raises(ValueError, match=r"batch\['completion'\] must be \[batch, max_new_tokens\] = \(4, 6\)"):
    completions(dict(data, completion=data["completion"][:, :3]), step=0, student_params=state.params)
  with pytest.raises(ValueError, match=r"lacks \['completion'\]"):
    completions({"prompt": data["prompt"]}, step=0, student_params=state.params)
  with pytest.raises(ValueError, match="step 0 generates with the student: pass student_params="):
    completions(data, step=0)


# ---------------------------------------------------------------------------------------------- the experiment


def test_addition_problems_are_reversed_sums_with_eos():
  from experiments import on_policy as experiment

  data = experiment.problems(200, 3, seed=0)
  assert data["prompt"].shape == (200, 8) and data["completion"].shape == (200, 5)
  for prompt, completion, keep in zip(data["prompt"], data["completion"], data["completion_mask"], strict=True):
    a, b = (int("".join(map(str, prompt[i : i + 3]))) for i in (0, 4))
    answer = completion[keep]
    assert answer[-1] == experiment.EOS and "".join(map(str, answer[:-1][::-1])) == str(a + b)


def test_experiment_quick_end_to_end(tmp_path):
  from experiments import common
  from experiments import on_policy as experiment

  config = experiment.get_config()
  config.quick = True
  config = common.resolve_quick(config, [])
  config.seeds, config.teacher_steps, config.student_steps = (0,), 20, 6
  config.arms = ("supervised_kd", "seq_kd", "gkd")
  results = experiment.run(config, tmp_path)
  assert set(results["arms"]) == {"supervised_kd", "seq_kd", "gkd_l1_b0.5"}
  for name, summary in results["arms"].items():
    assert 0 <= summary["exact_match"]["mean"] <= 1 and summary["bits_per_char"]["mean"] > 0, name
  assert results["runs"]["gkd_l1_b0.5"][0]["generated_fraction"] == 1.0
  assert results["runs"]["supervised_kd"][0]["generated_fraction"] == 0.0
  assert (
    set(results["step_costs"]) == set(results["arms"])
    and results["step_costs"]["supervised_kd"]["vs_supervised_kd"] == 1.0
  )
  for row in results["rows"][1:]:  # seeds past the plateau, counted per arm
    run = results["runs"][row["arm"]][0]
    assert row["learned"] == f"{int(run['exact_match'] >= experiment.LEARNED)}/1", row
  for name in ("results.md", "results.json", "on_policy.png", "teacher/params.msgpack"):
    assert (tmp_path / name).exists(), name
  before = (tmp_path / "seq_kd" / "seed0" / "result.json").read_text()
  experiment.run(config, tmp_path)  # finished sub-runs are reused
  assert (tmp_path / "seq_kd" / "seed0" / "result.json").read_text() == before


def test_experiment_bad_config_stops_before_training(tmp_path):
  from experiments import common
  from experiments import on_policy as experiment

  config = experiment.get_config()
  config.betas = (1.0,)
  with pytest.raises(
    common.ConfigError, match=r"betas=\(1.0,\) must be a non-empty sequence, each a number in \(0, 1\)"
  ):
    experiment.run(config, tmp_path)
  assert not list(tmp_path.iterdir())
