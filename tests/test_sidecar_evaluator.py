"""Evaluation apart from training: the sidecar evaluator (evaluate.py
--continuous, launch_local.py --evaluator) and --noeval_in_loop; and, on
the same trained run (which keeps an EMA), the export of the averages."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import read_scalars, run_in_process, run_script
from conftest import train_in_process
from research import data as data_lib
from research import evaluation
from research import export as export_lib
from research import model as model_lib

SETTINGS = dict(epochs=2, global_batch_size=32, steps_per_loop=2,
                checkpoint_every_steps=2, eval_every_steps=2,
                keep_checkpoints=2, export=False, eval_images=0,
                learning_rate=0.01, ema_decay=0.5,
                dataset="synthetic", synthetic_train_size=128,
                synthetic_test_size=32, seed=4, validation_size=32,
                eval_sets=("validation",),
                final_eval_sets=("validation", "test"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """96 training examples, batch 32: 6 steps; checkpoints at 2, 4, 6 of
  which rotation keeps 4 and 6; the loop evaluates validation at 2, 3, 4, 6;
  evaluated and exported with flip averaging."""
  run = tmp_path_factory.mktemp("sidecar") / "run"
  data = data_lib.make_synthetic(num_train=128, num_test=32, seed=4)
  metrics = train_in_process(run, data, **{**SETTINGS, "export": True,
                                           "flip_average": True})
  return run, metrics


class FakeTime:
  """A clock that each sleep advances, calling ``on_sleep`` first."""

  def __init__(self, on_sleep=lambda: None):
    self.now = 0.0
    self.on_sleep = on_sleep
    self.sleeps = 0

  def clock(self):
    return self.now

  def sleep(self, seconds):
    self.sleeps += 1
    self.on_sleep()
    self.now += seconds


def _sidecar(run, fake, **kwargs):
  lines = []
  records = evaluation.evaluate_continuously(
      str(run), timeout=10, poll_seconds=1, log=lines.append,
      sleep=fake.sleep, clock=fake.clock, **kwargs)
  return records, lines


def test_the_sidecar_gives_the_loops_numbers_once_per_checkpoint(
    finished_run):
  run, metrics = finished_run
  records, lines = _sidecar(run, FakeTime())
  # Rotation left ckpt-4 and ckpt-6: each evaluated once, at its own step,
  # and the final one ends the sidecar without waiting.
  assert [r["step"] for r in records] == [4, 6]
  assert lines[-1].startswith("evaluated the run's final checkpoint (step 6)")
  assert records[-1]["evaluations"] == metrics["evaluations"]  # Bitwise.
  loop = read_scalars(str(run / "validation"))
  sidecar = read_scalars(str(run / "evaluator" / "validation"))
  for tag in ("accuracy", "loss", "ece", "nll", "brier"):
    assert sidecar[tag] == [(s, v) for s, v in loop[tag] if s in (4, 6)]
  assert [s for s, _ in read_scalars(str(run / "evaluator" / "test"))[
      "accuracy"]] == [4, 6]
  assert json.loads((run / "evaluator" / "evaluations.json").read_text()
                    ) == records
  # Restarted, it finds everything evaluated and ends at once.
  again, _ = _sidecar(run, FakeTime())
  assert again == records


def test_the_sidecar_waits_skips_what_rotation_deleted_and_times_out(
    finished_run, tmp_path):
  """A copy of the run as it stood at step 4: the state file names ckpt-2
  (whose files rotation deleted meanwhile) and ckpt-4; then step 6 lands."""
  run, _ = finished_run
  early = tmp_path / "early"
  shutil.copytree(run, early, ignore=shutil.ignore_patterns("evaluator"))
  checkpoints = early / "checkpoints"
  final_state = (checkpoints / "checkpoint").read_text()
  (checkpoints / "checkpoint").write_text(
      'model_checkpoint_path: "ckpt-4"\n'
      'all_model_checkpoint_paths: "ckpt-2"\n'
      'all_model_checkpoint_paths: "ckpt-4"\n')
  moved = tmp_path / "later"
  moved.mkdir()
  for name in os.listdir(checkpoints):
    if name.startswith("ckpt-6"):
      shutil.move(str(checkpoints / name), str(moved / name))

  def save_step_6():  # The trainer's next save, while the sidecar waits.
    if fake.sleeps == 3:
      for name in os.listdir(moved):
        shutil.move(str(moved / name), str(checkpoints / name))
      (checkpoints / "checkpoint").write_text(final_state)

  fake = FakeTime(save_step_6)
  records, lines = _sidecar(early, fake, eval_sets=["test"])
  assert [r["step"] for r in records] == [4, 6]
  assert set(records[0]["evaluations"]) == {"test"}
  assert any(line.startswith("warning: skipped") and "ckpt-2" in line
             for line in lines)
  # Nothing new, and not the final step: it stops after --timeout.
  shutil.rmtree(early / "evaluator")
  for name in os.listdir(checkpoints):
    if name.startswith("ckpt-6"):
      os.remove(checkpoints / name)
  (checkpoints / "checkpoint").write_text(
      'model_checkpoint_path: "ckpt-4"\n'
      'all_model_checkpoint_paths: "ckpt-4"\n')
  fake = FakeTime()
  records, lines = _sidecar(early, fake)
  assert [r["step"] for r in records] == [4]
  assert lines[-1] == "no new checkpoint for 10 s; the evaluator stops"
  assert 10 <= fake.now <= 12


def test_a_sidecar_with_no_run_to_wait_for_stops_with_one_line(tmp_path):
  proc = run_in_process("evaluate.py", f"--model_dir={tmp_path / 'none'}",
                        "--continuous", "--timeout=0", "--poll_seconds=0")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "error: no training run appeared in")
  assert not os.path.exists(tmp_path / "none")
  proc = run_in_process("evaluate.py", f"--model_dir={tmp_path}",
                        "--continuous", "--checkpoint=best")
  assert proc.returncode == 2
  assert "drop --checkpoint" in proc.stderr.strip().splitlines()[-1]
  for averaging in ("flip_average", "shift_average"):
    proc = run_in_process("evaluate.py", f"--model_dir={tmp_path}",
                          "--continuous", f"--{averaging}=1")
    assert proc.returncode == 2
    assert f"drop --{averaging}" in proc.stderr.strip().splitlines()[-1]


def test_the_export_serves_the_averaged_weights(finished_run):
  run, _ = finished_run
  data = data_lib.make_synthetic(num_train=128, num_test=32, seed=4)
  averaged, _, _ = export_lib.load_model_from_run(str(run))
  raw, _, _ = export_lib.load_model_from_run(str(run))
  tf.train.Checkpoint(model=raw).restore(  # The trained weights.
      export_lib.latest_checkpoint(str(run / "checkpoints"))).expect_partial()
  exported = tf.saved_model.load(str(run / "export"))
  images = data.test_images[:16]
  served = exported.signatures["serving_default"](
      images=tf.constant(images))["probabilities"].numpy()

  def probabilities(model):  # As the run evaluates: with flip averaging.
    return tf.nn.softmax(model_lib.inference_logits(
        model, data_lib.to_float(images), flip_average=True)).numpy()
  np.testing.assert_allclose(served, probabilities(averaged), rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(served, probabilities(raw), atol=1e-4)


def test_flip_averaging_in_evaluation_and_in_the_export(finished_run,
                                                       tmp_path):
  run, metrics = finished_run
  data = data_lib.make_synthetic(num_train=128, num_test=32, seed=4)
  model, spec, _ = export_lib.load_model_from_run(str(run))
  images, labels = data.test_images, data.test_labels
  plain = model(data_lib.to_float(images)).numpy()
  mirrored = model(data_lib.to_float(images[:, :, ::-1])).numpy()
  averaged = (plain + mirrored) / 2
  assert spec["model"]["flip_average"] is True  # model.json
  # The run's own evaluation and evaluate.py's override either way.
  evaluations = {
      flip: evaluation.evaluate_run(str(run), eval_sets=["test"],
                                    flip_average=flip)
      for flip in (False, True)}
  for flip, logits in ((False, plain), (True, averaged)):
    assert evaluations[flip]["flip_average"] is flip
    assert evaluations[flip]["shift_average"] == 0  # As the run.
    result = evaluations[flip]["evaluations"]["test"]
    assert result["correct"] == int((logits.argmax(1) == labels).sum())
    nll = -tf.nn.log_softmax(logits).numpy()[np.arange(len(labels)), labels]
    np.testing.assert_allclose(result["nll"], nll.mean(), rtol=1e-5)
  assert evaluations[True]["evaluations"]["test"] == \
      metrics["evaluations"]["test"]  # The loop's own, bitwise.
  assert abs(evaluations[True]["evaluations"]["test"]["nll"] -
             evaluations[False]["evaluations"]["test"]["nll"]) > 1e-4
  # The training's export predicts the same way, so it is mirror-blind;
  # export.py --noflip_average serves the plain logits.
  serve = tf.saved_model.load(str(run / "export")).signatures[
      "serving_default"]
  served = serve(images=tf.constant(images))["probabilities"].numpy()
  np.testing.assert_allclose(served, tf.nn.softmax(averaged).numpy(),
                             rtol=1e-5, atol=1e-6)
  served_mirrored = serve(images=tf.constant(images[:, :, ::-1]))
  np.testing.assert_allclose(served_mirrored["probabilities"].numpy(),
                             served, rtol=1e-5, atol=1e-6)
  proc = run_in_process("export.py", f"--model_dir={run}",
                        f"--export_dir={tmp_path / 'plain'}",
                        "--noflip_average")
  assert proc.returncode == 0, proc.stderr
  plain_served = tf.saved_model.load(str(tmp_path / "plain")).signatures[
      "serving_default"](images=tf.constant(images))["probabilities"]
  np.testing.assert_allclose(plain_served.numpy(),
                             tf.nn.softmax(plain).numpy(), rtol=1e-5,
                             atol=1e-6)
  assert np.abs(plain_served.numpy() - served).max() > 1e-4


def _views(images, shift):
  """The ten views shift averaging with flips takes, built in NumPy: the
  image and its translations by ``shift`` pixels, zero-filled, and the
  mirror of each."""
  padded = np.pad(images, [(0, 0), (shift, shift), (shift, shift), (0, 0)])
  height, width = images.shape[1:3]
  views = [images]
  for rows, columns in ((-1, 0), (1, 0), (0, -1), (0, 1)):
    top, left = shift - rows * shift, shift - columns * shift
    views.append(padded[:, top:top + height, left:left + width])
  return views + [view[:, :, ::-1] for view in views]


def test_shift_averaging_translates_with_zeros_moved_in():
  # A "model" whose logits are its input pixels shows the views exactly.
  images = np.random.default_rng(0).uniform(
      size=(3, 5, 6, 2)).astype(np.float32)
  pixels = tf.keras.Sequential([tf.keras.Input((5, 6, 2)),
                                tf.keras.layers.Flatten()])
  views = _views(images, 2)
  assert views[2][0, 2, 3, 0] == images[0, 0, 3, 0]  # Down: row 0 -> 2.
  assert (views[2][:, :2] == 0).all()
  expected = np.mean([view.reshape(3, -1) for view in views], axis=0)
  averaged = model_lib.inference_logits(pixels, images, flip_average=True,
                                        shift_average=2).numpy()
  np.testing.assert_allclose(averaged, expected, rtol=1e-6)
  shifted_only = model_lib.inference_logits(pixels, images, shift_average=2)
  np.testing.assert_allclose(
      shifted_only.numpy(),
      np.mean([view.reshape(3, -1) for view in views[:5]], axis=0),
      rtol=1e-6)


def test_shift_averaging_in_evaluation_and_in_the_export(finished_run,
                                                        tmp_path):
  run, metrics = finished_run
  data = data_lib.make_synthetic(num_train=128, num_test=32, seed=4)
  model, _, _ = export_lib.load_model_from_run(str(run))
  images, labels = data.test_images, data.test_labels
  averaged = np.mean([model(data_lib.to_float(view)).numpy()
                      for view in _views(images, 1)], axis=0)
  # evaluate.py's override (the run evaluated with flips alone).
  proc = run_in_process("evaluate.py", f"--model_dir={run}",
                        "--eval_sets=test", "--shift_average=1",
                        f"--json_out={tmp_path / 'shifted.json'}")
  assert proc.returncode == 0, proc.stderr
  assert "with 1-pixel shift averaging and flip averaging" in proc.stdout
  results = json.loads((tmp_path / "shifted.json").read_text())
  assert results["shift_average"] == 1 and results["flip_average"]
  result = results["evaluations"]["test"]
  assert result["correct"] == int((averaged.argmax(1) == labels).sum())
  nll = -tf.nn.log_softmax(averaged).numpy()[np.arange(len(labels)), labels]
  np.testing.assert_allclose(result["nll"], nll.mean(), rtol=1e-5)
  # The run's own evaluation (flips alone) differs.
  assert abs(metrics["evaluations"]["test"]["nll"] - result["nll"]) > 1e-4
  # export.py serves the same average.
  proc = run_in_process("export.py", f"--model_dir={run}",
                        f"--export_dir={tmp_path / 'shifted'}",
                        "--shift_average=1")
  assert proc.returncode == 0, proc.stderr
  served = tf.saved_model.load(str(tmp_path / "shifted")).signatures[
      "serving_default"](images=tf.constant(images))["probabilities"]
  np.testing.assert_allclose(served.numpy(), tf.nn.softmax(averaged).numpy(),
                             rtol=1e-5, atol=1e-6)


def test_noeval_in_loop_trains_without_evaluating(tmp_path):
  data = data_lib.make_synthetic(num_train=128, num_test=32, seed=4)
  metrics = train_in_process(tmp_path / "run", data, **{
      **SETTINGS, "eval_sets": (), "final_eval_sets": (), "ema_decay": 0.0})
  assert metrics["evaluations"] == {} and metrics["eval_accuracy"] is None
  assert metrics["global_step"] == 6
  assert not os.path.exists(tmp_path / "run" / "validation")
  assert os.path.exists(tmp_path / "run" / "checkpoints" / "ckpt-6.index")
  proc = run_in_process("train_loop.py", "--flagfile=configs/smoke.flags",
                        f"--model_dir={tmp_path / 'bad'}", "--noeval_in_loop",
                        "--eval_sets=test")
  assert proc.returncode == 2
  assert "--noeval_in_loop evaluates nothing" in proc.stderr.splitlines()[-1]
  assert not os.listdir(tmp_path / "bad")  # Checked writable; nothing in it.


@pytest.mark.slow
def test_launch_local_runs_a_sidecar_beside_a_real_trainer(tmp_path):
  """One worker saving every 8 steps and keeping 2 checkpoints, and the
  sidecar: it evaluates each checkpoint it finds once, at its step,
  including the two that survive rotation, gives the loop's numbers, and
  ends by itself after the final one."""
  model_dir = tmp_path / "run"
  proc = run_script(
      "launch_local.py", "--num_workers=1", "--evaluator",
      "--evaluator_flags=--timeout=120,--poll_seconds=0.2", "--",
      "--flagfile=configs/smoke.flags", f"--model_dir={model_dir}",
      "--checkpoint_every_steps=8", "--keep_checkpoints=2", "--noexport",
      "--eval_images=0", timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "launched a sidecar evaluator" in proc.stdout
  assert "[evaluator] evaluated the run's final checkpoint (step 48)" in (
      proc.stdout)
  records = json.loads((model_dir / "evaluator" / "evaluations.json"
                        ).read_text())
  steps = [r["step"] for r in records]
  assert steps == sorted(set(steps)) and {40, 48} <= set(steps)
  assert set(steps) <= set(range(8, 49, 8))
  loop = dict(read_scalars(str(model_dir / "test"))["accuracy"])
  sidecar = dict(read_scalars(str(model_dir / "evaluator" / "test"))[
      "accuracy"])
  shared = set(loop) & set(sidecar)
  assert 48 in shared
  for step in shared:
    assert sidecar[step] == loop[step], step
