"""Evaluation sets: validation during training, the test set once at the
end, each its own TensorBoard run and metrics.json entry (issue 16)."""

import dataclasses
import json
import os

import pytest

from conftest import read_scalars, train_in_process
from research import config as config_lib
from research import data as data_lib
from research import evaluation
from research.errors import UserError
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


def _with_flipped_test_set(config, *, seed):
  """A source adding its own set: the test images mirrored."""
  base = data_lib.make_synthetic(num_train=config.synthetic_train_size,
                                 num_test=config.synthetic_test_size,
                                 seed=seed)
  return dataclasses.replace(base, extra_eval_sets={
      "test_flipped": (base.test_images[:, :, ::-1], base.test_labels)})


@pytest.fixture
def flipped_source():
  data_lib.register_dataset("synthetic_flipped", _with_flipped_test_set)
  yield
  data_lib.DATASETS.unregister("synthetic_flipped")


def test_a_dataset_adds_its_own_evaluation_set(tmp_path, flipped_source):
  config = config_lib.DataConfig(dataset="synthetic_flipped",
                                 synthetic_train_size=64,
                                 synthetic_test_size=32)
  data = data_lib.load(config, seed=1)
  assert data.eval_set_names == ("test", "test_flipped")
  settings = dict(epochs=1, global_batch_size=32, steps_per_loop=2,
                  checkpoint_every_steps=0, seed=1, export=False,
                  eval_images=2, dataset="synthetic_flipped",
                  synthetic_train_size=64, synthetic_test_size=32)
  metrics = train_in_process(tmp_path / "run", data, **settings,
                             eval_sets=("test", "test_flipped"),
                             final_eval_sets=("test_flipped",))
  assert set(metrics["evaluations"]) == {"test", "test_flipped"}
  flipped = metrics["evaluations"]["test_flipped"]
  assert flipped["count"] == 32
  assert flipped["loss"] != metrics["evaluations"]["test"]["loss"]
  assert [s for s, _ in read_scalars(str(tmp_path / "run" / "test_flipped"))[
      "accuracy"]] == [2]
  # evaluate.py rebuilds it through the registered source, every set.
  again = evaluation.evaluate_run(str(tmp_path / "run"))
  # (As JSON: a class with no example has a NaN accuracy.)
  assert (json.dumps(again["evaluations"], sort_keys=True) ==
          json.dumps(metrics["evaluations"], sort_keys=True))
  # A set the data does not have: one clear error, before training.
  with pytest.raises(UserError, match="no evaluation set 'noisy'; this data "
                     "has test, test_flipped"):
    train_in_process(tmp_path / "other", data, **settings,
                     eval_sets=("noisy",), final_eval_sets=())
  assert not os.path.exists(tmp_path / "other")


@pytest.mark.parametrize("name", ["test", "train", "evaluator", "Noisy",
                                  "a/b", ""])
def test_an_extra_set_cannot_take_a_reserved_or_unsafe_name(name):
  data = data_lib.make_synthetic(num_train=8, num_test=4, seed=0)
  with pytest.raises(ValueError, match="extra evaluation set cannot be"):
    dataclasses.replace(data, extra_eval_sets={name: (data.test_images,
                                                      data.test_labels)})
