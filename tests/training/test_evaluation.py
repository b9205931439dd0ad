"""Tests for jaxkd.training.evaluation: padded batches count each example once, in every placement."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jaxkd import train
from jaxkd.models import MLP
from jaxkd.state import create_train_state
from jaxkd.training import evaluation


def _arrays(n: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    "image": rng.normal(size=(n, 4, 4, 1)).astype(np.float32),
    "label": rng.integers(0, 3, size=n).astype(np.int32),
  }


def test_pad_batches_masks_the_tail_and_keeps_every_row():
  arrays = _arrays(10)
  batches = list(evaluation.pad_batches(arrays, batch_size=4))
  assert [b["image"].shape[0] for b in batches] == [4, 4, 4]
  assert [int(b["mask"].sum()) for b in batches] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in batches]), arrays["label"])
  with pytest.raises(ValueError, match="same length"):
    list(evaluation.pad_batches({"a": np.zeros(3), "b": np.zeros(4)}, batch_size=2))


@pytest.mark.parametrize("placement", ["single", "pmap", "data_parallel"])
def test_eval_fn_matches_a_direct_computation(placement):
  model = MLP(hidden_sizes=(8,), num_classes=3)
  arrays = _arrays(30)
  state = create_train_state(model, optax.sgd(0.1), arrays["image"][:1], rng=0)
  eval_fn = evaluation.make_eval_fn(train.make_eval_step(placement=placement), arrays, batch_size=8)
  metrics = eval_fn(state)
  logits = model.apply({"params": state.params}, arrays["image"])
  assert metrics["count"] == 30
  assert metrics["accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == arrays["label"])))
  log_probs = jax.nn.log_softmax(logits)
  expected_ce = -float(np.mean(np.take_along_axis(np.asarray(log_probs), arrays["label"][:, None], 1)))
  assert metrics["ce"] == pytest.approx(expected_ce, rel=1e-5)
