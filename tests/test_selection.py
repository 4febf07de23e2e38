"""Model selection (issue 16): the best checkpoint and early stopping."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import read_scalars, run_in_process, train_in_process
from research import data as data_lib
from research import export as export_lib
from research.controller import Cadence
from research.controller import Controller
from research.controller import Evaluation
from research.selection import BestCheckpoint
from research.selection import EarlyStopping
from research.selection import SelectionState
from test_controller import FakeCheckpointer, FakeSummaries, FakeTrainer


def _evaluation(step, accuracy):
  result = {"accuracy": accuracy, "loss": 1 - accuracy, "nll": 1.0,
            "brier": 0.5, "ece": 0.1, "correct": 0, "count": 10,
            "class_accuracy": [accuracy]}
  return Evaluation(step, {"validation": result}, 0.0)


def _selection(tmp_path, metric="validation/accuracy"):
  state = SelectionState()
  checkpoint = tf.train.Checkpoint(weights=tf.Variable(0.0), selection=state)
  best = BestCheckpoint(metric=metric, state=state, checkpoint=checkpoint,
                        model_dir=str(tmp_path), is_chief=True,
                        log=lambda line: None)
  return best, checkpoint


def test_the_best_is_the_first_evaluation_of_the_extreme(tmp_path):
  best, checkpoint = _selection(tmp_path)
  for step, accuracy in [(10, 0.5), (20, 0.7), (30, 0.7), (40, 0.6)]:
    checkpoint.weights.assign(step)
    best.after_evaluation(_evaluation(step, accuracy))
  info = best.info()
  assert (info["step"], info["value"]) == (20, 0.7)
  assert info["evaluations"]["validation"]["accuracy"] == 0.7
  # The saved weights are those of step 20, and only that checkpoint.
  restored = tf.train.Checkpoint(weights=tf.Variable(-1.0))
  restored.restore(best.path).expect_partial()
  assert float(restored.weights.numpy()) == 20.0
  assert [f for f in os.listdir(tmp_path / "best")
          if f.endswith(".index")] == ["ckpt-20.index"]
  # A loss-like metric: smaller is better.
  lower, checkpoint = _selection(tmp_path / "loss", "validation/loss")
  for step, accuracy in [(10, 0.5), (20, 0.7), (30, 0.6)]:
    lower.after_evaluation(_evaluation(step, accuracy))
  assert lower.info()["step"] == 20  # loss = 1 - accuracy


@pytest.mark.parametrize("values,patience,min_delta,stops_after", [
    ([0.5, 0.6, 0.6, 0.55, 0.7], 2, 0.0, 4),   # 0.6 twice not better.
    ([0.5, 0.6, 0.6, 0.7, 0.65, 0.66], 2, 0.0, 6),
    ([0.5, 0.53, 0.56, 0.58, 0.62], 2, 0.05, None),  # 0.56, 0.62 count.
    ([0.5, 0.53, 0.54, 0.58], 2, 0.05, 3),
])
def test_patience_counts_evaluations_without_an_improvement(
    tmp_path, values, patience, min_delta, stops_after):
  best, _ = _selection(tmp_path)
  stopping = EarlyStopping(best=best, patience=patience, min_delta=min_delta)
  stopped = None
  for i, value in enumerate(values, start=1):
    evaluation = _evaluation(i, value)
    best.after_evaluation(evaluation)
    stopping.after_evaluation(evaluation)
    if stopping.stop_reason():
      stopped = i
      break
  assert stopped == stops_after
  if stopped:
    assert "validation/accuracy has not improved" in stopping.stop_reason()


def test_the_controller_ends_early_saves_and_evaluates_the_final_sets(
    tmp_path):
  events = []
  values = iter([0.5, 0.6, 0.55, 0.55, 0.9])

  class Evaluator(FakeTrainer):
    def evaluate(self):
      events.append(("evaluate", trainer.step))
      return _evaluation(trainer.step, next(values)).result

  trainer = Evaluator(events)
  best, _ = _selection(tmp_path)
  controller = Controller(
      trainer=trainer, evaluator=trainer,
      cadence=Cadence(total_steps=50, steps_per_loop=10, steps_per_epoch=10,
                      checkpoint_every_steps=0),
      start_step=0, checkpointer=FakeCheckpointer(events),
      summaries=FakeSummaries(events),
      actions=[best, EarlyStopping(best=best, patience=2)],
      final_evaluator=lambda: events.append(("final",)) or {"test": {}},
      log=lambda line: None)
  last = controller.run()
  assert controller.stop_reason.startswith("early stopping")
  assert last.step == 40 and set(last.result) == {"validation", "test"}
  assert ("save", 40) in events and events.index(("save", 40)) < events.index(
      ("final",))
  assert not [e for e in events if e[0] == "train" and e[1] >= 40]
  assert best.info()["step"] == 20


def _data():
  return data_lib.make_synthetic(num_train=256, num_test=64, seed=3)


def _run(model_dir, data, **overrides):
  """Trains on ``data``, which must be what the config's synthetic source
  makes (``_data``), so that scripts/evaluate.py rebuilds it."""
  settings = dict(epochs=5, global_batch_size=32, steps_per_loop=8,
                  checkpoint_every_steps=0, seed=3, eval_images=0,
                  dataset="synthetic", synthetic_train_size=256,
                  synthetic_test_size=64,
                  validation_size=64, eval_sets=("validation",),
                  final_eval_sets=("validation", "test"),
                  best_metric="validation/accuracy")
  settings.update(overrides)
  return train_in_process(model_dir, data, **settings)


@pytest.fixture(scope="module")
def selected_run(tmp_path_factory):
  """A run selected on validation ECE, which is lowest early here (while
  accuracy still climbs), so the best is not the last."""
  tmp_path = tmp_path_factory.mktemp("selected")
  data = _data()
  metrics = _run(tmp_path / "run", data, learning_rate=0.003,
                 best_metric="validation/ece")
  return tmp_path, data, metrics


@pytest.mark.slow
def test_a_run_keeps_and_exports_the_best_and_reports_it(selected_run):
  tmp_path, data, metrics = selected_run
  curve = read_scalars(str(tmp_path / "run" / "validation"))["ece"]
  values = [value for _, value in curve]
  best_step = curve[int(np.argmin(values))][0]
  with open(tmp_path / "run" / "best" / "info.json") as f:
    info = json.load(f)
  assert info["step"] == best_step == metrics["best"]["step"]
  assert best_step < metrics["global_step"]  # Else the test proves nothing.
  assert info["value"] == pytest.approx(min(values))
  assert metrics["best"]["evaluations"]["validation"]["ece"] == info["value"]
  # The export serves the best checkpoint's weights.
  model, _, _ = export_lib.load_model_from_run(
      str(tmp_path / "run"),
      str(tmp_path / "run" / "best" / f"ckpt-{best_step}"))
  exported = tf.saved_model.load(str(tmp_path / "run" / "export"))
  images = data.test_images[:16]
  served = exported.signatures["serving_default"](
      images=tf.constant(images))["probabilities"].numpy()
  expected = tf.nn.softmax(model(data_lib.to_float(images))).numpy()
  np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
  final, _, _ = export_lib.load_model_from_run(str(tmp_path / "run"))
  assert not np.allclose(served, tf.nn.softmax(
      final(data_lib.to_float(images))).numpy(), atol=1e-3)


@pytest.mark.slow
def test_resume_keeps_the_best_then_early_stopping_ends_the_run(tmp_path):
  """A rate too small to change any prediction: validation accuracy stays
  put, so the first evaluation (step 6) stays the best. Patience 2: two
  epochs, then a resume to five: the equal evaluations at steps 12 and 18
  do not replace the best, and the second of them ends the run at step 18
  (only the restored state knows the best and the count)."""
  data = _data()
  settings = dict(learning_rate=1e-12, export=False,
                  early_stopping_patience=2)
  first = _run(tmp_path / "run", data, epochs=2, **settings)
  assert first["best"]["step"] == 6 and "stopped_early" not in first
  lines = []
  metrics = _run(tmp_path / "run", data, log=lines.append, **settings)
  # 192 training examples: 6 steps an epoch.
  assert metrics["global_step"] == 18
  assert metrics["best"]["step"] == 6
  assert metrics["stopped_early"]["step"] == 18
  assert "has not improved" in metrics["stopped_early"]["reason"]
  assert set(metrics["evaluations"]) == {"validation", "test"}
  assert any(line.startswith("early stopping") for line in lines)
  assert tf.train.latest_checkpoint(
      str(tmp_path / "run" / "checkpoints")).endswith("ckpt-18")
  again = _run(tmp_path / "run", data, **settings)
  assert again == json.loads((tmp_path / "run" / "metrics.json").read_text())
  # More patience (a change a resume allows): training goes on from step
  # 18 until the restored count (2) reaches 3, one evaluation later.
  more = _run(tmp_path / "run", data, **{**settings,
                                         "early_stopping_patience": 3})
  assert more["global_step"] == more["stopped_early"]["step"] == 24
  assert more["best"]["step"] == 6


@pytest.mark.slow
def test_evaluate_script_gives_the_loops_numbers_for_latest_and_best(
    selected_run, tmp_path):
  run_dir, _, metrics = selected_run
  out = tmp_path / "latest.json"
  proc = run_in_process("evaluate.py", f"--model_dir={run_dir / 'run'}",
                        f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr
  latest = json.loads(out.read_text())
  assert latest["step"] == 30
  for name in ("validation", "test"):  # Bitwise what the loop reported.
    assert latest["evaluations"][name] == metrics["evaluations"][name]
  assert "test: accuracy" in proc.stdout
  # The best checkpoint: the loop's evaluation of it, and now its test set.
  proc = run_in_process("evaluate.py", f"--model_dir={run_dir / 'run'}",
                        "--checkpoint=best", f"--json_out={out}")
  best = json.loads(out.read_text())
  assert best["step"] == metrics["best"]["step"] < latest["step"]
  for key, value in metrics["best"]["evaluations"]["validation"].items():
    assert best["evaluations"]["validation"][key] == pytest.approx(value)
  assert best["evaluations"]["test"]["count"] == 64


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
  """A run without a validation split or a best metric."""
  model_dir = tmp_path_factory.mktemp("plain") / "run"
  data = data_lib.make_synthetic(num_train=64, num_test=16, seed=0)
  train_in_process(model_dir, data, epochs=1, global_batch_size=32,
                   steps_per_loop=8, export=False, eval_images=0,
                   dataset="synthetic", synthetic_train_size=64,
                   synthetic_test_size=16, seed=0)
  return model_dir


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--checkpoint=best"], "the run kept no best checkpoint: train with "
     "--best_metric"),
    (["--eval_sets=validation"], "no evaluation set 'validation'"),
    (["--checkpoint=/no/such/ckpt-3"], "ckpt-3"),
    (["--model_dir=/"], "holds no config.json"),
])
def test_evaluate_script_errors_are_one_line(plain_run, args, message):
  proc = run_in_process("evaluate.py", f"--model_dir={plain_run}", *args)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and message in lines[-1], lines


def test_a_resumed_run_that_had_stopped_early_trains_no_further(tmp_path):
  """Killed after its early stop was saved but before metrics.json: the
  restored count ends the run before any step, as the first run would have,
  and patience running out at the very last step is no early stop."""
  events = []
  best, _ = _selection(tmp_path)
  best.state.stale_evaluations.assign(2)
  stopping = EarlyStopping(best=best, patience=2)
  assert stopping.stop_reason().startswith("early stopping")
  trainer = FakeTrainer(events)
  trainer.step = 40

  def resumed_at_40(total_steps):
    return Controller(
        trainer=trainer, evaluator=trainer,
        cadence=Cadence(total_steps=total_steps, steps_per_loop=10,
                        steps_per_epoch=10),
        start_step=40, checkpointer=FakeCheckpointer(events),
        summaries=FakeSummaries(events), actions=[best, stopping],
        log=lambda line: None)

  controller = resumed_at_40(50)
  last = controller.run()
  assert controller.stop_reason and last.step == 40
  assert not [e for e in events if e[0] == "train"]
  # At the last step the same count is no early stop: the run simply ends.
  at_end = resumed_at_40(40)
  at_end.run()
  assert at_end.stop_reason is None


def test_a_resume_adopts_a_best_saved_after_its_checkpoint(tmp_path):
  """Killed after best/ got step 30 (and before info.json was rewritten),
  resumed from a regular checkpoint of step 20 whose state knew only the
  best of step 10: the resumed selection goes on from step 30, and
  info.json is rewritten from the best checkpoint, which holds its own."""
  best, checkpoint = _selection(tmp_path)
  checkpoint.weights.assign(10)
  best.after_evaluation(_evaluation(10, 0.5))
  regular = checkpoint.write(str(tmp_path / "regular" / "ckpt-20"))
  checkpoint.weights.assign(30)
  best.after_evaluation(_evaluation(30, 0.8))
  stale_info = json.loads((tmp_path / "best" / "info.json").read_text())
  stale_info.update(step=10, value=0.5)  # As if killed before rewriting.
  (tmp_path / "best" / "info.json").write_text(json.dumps(stale_info))

  state = SelectionState()
  tf.train.Checkpoint(weights=tf.Variable(0.0), selection=state).restore(
      regular).assert_consumed()
  assert int(state.best_step.numpy()) == 10
  lines = []
  resumed = BestCheckpoint(
      metric="validation/accuracy", state=state,
      checkpoint=tf.train.Checkpoint(weights=tf.Variable(0.0),
                                     selection=state),
      model_dir=str(tmp_path), is_chief=True, log=lines.append)
  assert (int(state.best_step.numpy()), float(state.best_value.numpy())) == (
      30, 0.8)
  assert resumed.info()["step"] == 30 and resumed.info()["value"] == 0.8
  assert any("best/ holds the evaluation of step 30" in l for l in lines)
  resumed.after_evaluation(_evaluation(40, 0.7))  # Better than 10, not 30.
  assert not resumed.improved and resumed.info()["step"] == 30


@pytest.mark.slow
def test_evaluate_script_on_a_run_with_no_checkpoint_yet(plain_run, tmp_path):
  started = tmp_path / "started"
  started.mkdir()
  (started / "config.json").write_text((plain_run / "config.json").read_text())
  proc = run_in_process("evaluate.py", f"--model_dir={started}")
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: no checkpoint under") and "train first" in last
