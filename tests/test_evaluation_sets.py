"""Evaluation sets: validation during training, the test set once at the
end, each its own TensorBoard run and metrics.json entry (issue 16)."""

import json
import os

import pytest

from conftest import read_scalars, train_in_process
from research import config as config_lib
from research import data as data_lib
from research.summaries import last_logged_steps


@pytest.mark.slow
def test_validation_during_training_and_the_test_set_once_at_the_end(
    tmp_path):
  data = data_lib.make_synthetic(num_train=256, num_test=128, seed=2)
  lines = []
  # 256 - 64 held out = 192 training examples: 6 steps an epoch.
  metrics = train_in_process(
      tmp_path / "run", data, epochs=2, global_batch_size=32,
      steps_per_loop=8, checkpoint_every_steps=0, seed=1, export=False,
      eval_images=4, validation_size=64, eval_sets=("validation",),
      final_eval_sets=("validation", "test"), log=lines.append)
  validation = read_scalars(str(tmp_path / "run" / "validation"))
  test = read_scalars(str(tmp_path / "run" / "test"))
  for tag in ("loss", "accuracy", "nll", "brier", "ece"):
    assert [step for step, _ in validation[tag]] == [6, 12], tag
    assert [step for step, _ in test[tag]] == [12], tag
  # Images too: the test run has them only at the end.
  images = last_logged_steps(str(tmp_path / "run" / "test"))
  assert images["confusion_matrix"] == images["reliability_diagram"] == 12
  assert not os.path.exists(tmp_path / "run" / "eval")

  assert metrics["global_step"] == 12
  assert set(metrics["evaluations"]) == {"validation", "test"}
  assert metrics["evaluations"]["validation"]["count"] == 64
  assert metrics["evaluations"]["test"]["count"] == 128
  assert metrics["eval_set"] == "test"
  test_result = metrics["evaluations"]["test"]
  assert metrics["eval_accuracy"] == test_result["accuracy"]
  assert test_result["accuracy"] == pytest.approx(test["accuracy"][0][1])
  assert metrics["evaluations"]["validation"]["accuracy"] == pytest.approx(
      validation["accuracy"][-1][1])
  with open(tmp_path / "run" / "metrics.json") as f:
    assert json.load(f)["evaluations"]["test"]["count"] == 128
  evals = [line.split(" step ")[0] for line in lines
           if line.startswith("eval ")]
  assert evals == ["eval validation"] * 2 + ["eval test"]
  with open(tmp_path / "run" / "data.json") as f:
    facts = json.load(f)
  assert (facts["train_examples"], facts["validation_examples"]) == (192, 64)


def test_the_defaults_follow_the_split():
  assert config_lib.default_eval_sets(0) == (("test",), ("test",))
  assert config_lib.default_eval_sets(5000) == (("validation",),
                                                ("validation", "test"))
  with pytest.raises(ValueError, match="validation_size is 0"):
    config_lib.from_flat({"model_dir": "d", "final_eval_sets": (
        "validation", "test")})
