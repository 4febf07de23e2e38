"""The controller's cadence, driven by a fake trainer: no TensorFlow runs.

Each test records what the controller asks of its collaborators (train n
steps, evaluate, commit, save) in one event list and checks the sequence.
"""

import pytest

from research.controller import Action
from research.controller import Cadence
from research.controller import Controller
from research.errors import NonFiniteLossError
from research.preemption import Preempted


class FakeTrainer:
  """Trains nothing; records call sizes; can report a non-finite step."""

  def __init__(self, events, nonfinite_at=None):
    self.events = events
    self.step = 0
    self.nonfinite_at = nonfinite_at  # A global step (1-based) that fails.

  def train(self, num_steps):
    self.events.append(("train", self.step, num_steps))
    first, self.step = self.step, self.step + num_steps
    bad = -1
    if self.nonfinite_at is not None and first < self.nonfinite_at <= self.step:
      bad = self.nonfinite_at - first - 1
    return {"nonfinite_step": bad}

  def evaluate(self):
    self.events.append(("evaluate", self.step))
    return {"step": self.step}


class FakeCheckpointer:

  def __init__(self, events):
    self.events = events
    self.saved = []

  def save(self, step):
    self.events.append(("save", step))
    self.saved.append(step)
    return f"ckpt-{step}"

  def latest(self):
    return f"ckpt-{self.saved[-1]}" if self.saved else None


class FakeSummaries:

  def __init__(self, events):
    self.events = events

  def commit(self):
    self.events.append(("commit",))

  def close(self):
    self.events.append(("close",))


class Recorder(Action):
  """Records every hook it gets."""

  def __init__(self, events, boundary=None):
    self.events = events
    self.boundary = boundary

  def next_boundary(self, step):
    return self.boundary if self.boundary and step < self.boundary else None

  def before_train(self, step):
    self.events.append(("before_train", step))

  def after_train(self, call):
    self.events.append(("after_train", call.first_step, call.step))

  def after_evaluation(self, evaluation):
    self.events.append(("after_evaluation", evaluation.step))

  def at_end(self, evaluation):
    self.events.append(("at_end", evaluation.step))

  def close(self):
    self.events.append(("action_close",))


def _controller(events, *, start_step=0, actions=(), trainer=None,
                stop_requested=lambda: None, **cadence):
  settings = dict(total_steps=48, steps_per_loop=8, steps_per_epoch=16,
                  checkpoint_every_steps=16)
  settings.update(cadence)
  trainer = trainer or FakeTrainer(events)
  trainer.step = start_step
  checkpointer = FakeCheckpointer(events)
  return Controller(
      trainer=trainer, evaluator=trainer, cadence=Cadence(**settings),
      start_step=start_step, checkpointer=checkpointer,
      summaries=FakeSummaries(events), actions=actions,
      stop_requested=stop_requested, log=lambda line: events.append(
          ("log", line))), checkpointer


def _calls(events):
  return [e[1:] for e in events if e[0] == "train"]


def test_calls_end_at_epoch_eval_and_checkpoint_boundaries():
  events = []
  controller, checkpointer = _controller(
      events, total_steps=50, steps_per_loop=8, steps_per_epoch=20,
      eval_every_steps=7, checkpoint_every_steps=12)
  final = controller.run()
  sizes = [n for _, n in _calls(events)]
  ends = []
  step = 0
  for n in sizes:
    step += n
    ends.append(step)
  # Every multiple of 20 (epochs), 7 (evals) and 12 (checkpoints) and the
  # end is the end of some call; no call is longer than 8.
  for boundary in (7, 12, 14, 20, 21, 24, 28, 35, 36, 40, 42, 48, 49, 50):
    assert boundary in ends, (boundary, ends)
  assert max(sizes) <= 8 and ends[-1] == 50
  assert ends == [7, 12, 14, 20, 21, 24, 28, 35, 36, 40, 42, 48, 49, 50]
  evaluated = [e[1] for e in events if e[0] == "evaluate"]
  assert evaluated == [7, 14, 20, 21, 28, 35, 40, 42, 49]
  assert checkpointer.saved == [12, 24, 36, 48, 50]
  assert final.step == 49 and final.result == {"step": 49}


def test_summaries_are_committed_before_every_save():
  events = []
  controller, checkpointer = _controller(events)
  controller.run()
  assert checkpointer.saved == [16, 32, 48]
  for i, event in enumerate(events):
    if event[0] == "save":
      assert events[i - 1] == ("commit",), events[i - 3:i + 1]
  assert events[-1] == ("close",)


def test_without_periodic_checkpoints_every_call_commits_and_the_end_saves():
  events = []
  controller, checkpointer = _controller(events, checkpoint_every_steps=0)
  controller.run()
  assert checkpointer.saved == [48]
  commits = [i for i, e in enumerate(events) if e == ("commit",)]
  trains = [i for i, e in enumerate(events) if e[0] == "train"]
  assert len(commits) == len(trains) == 6
  # Each call's summaries are committed before the next call starts.
  for call, commit, next_call in zip(trains, commits, trains[1:] + [10**9]):
    assert call < commit < next_call


def test_actions_see_every_call_and_evaluation_in_order_then_end_and_close():
  events = []
  controller, _ = _controller(events, actions=[Recorder(events)])
  controller.run()
  hooks = [e for e in events if e[0] in ("before_train", "after_train",
                                         "after_evaluation", "at_end",
                                         "action_close")]
  expected = []
  for first in range(0, 48, 8):
    expected += [("before_train", first), ("after_train", first, first + 8)]
    if (first + 8) % 16 == 0:
      expected.append(("after_evaluation", first + 8))
  expected += [("at_end", 48), ("action_close",)]
  assert hooks == expected
  # The end comes after the event files are closed.
  assert events.index(("close",)) < events.index(("at_end", 48))


def test_an_action_boundary_cuts_calls():
  events = []
  controller, _ = _controller(events, actions=[Recorder(events, boundary=11)])
  controller.run()
  assert [n for _, n in _calls(events)][:3] == [8, 3, 5]


def test_a_resumed_run_trains_only_what_is_left():
  events = []
  controller, checkpointer = _controller(events, start_step=20)
  controller.run()
  assert _calls(events) == [(20, 8), (28, 4), (32, 8), (40, 8)]
  assert checkpointer.saved == [32, 48]


def test_a_finished_run_evaluates_once_and_trains_nothing():
  events = []
  controller, checkpointer = _controller(events, start_step=48)
  final = controller.run()
  assert _calls(events) == [] and checkpointer.saved == []
  assert final.step == 48 and ("evaluate", 48) in events


def test_a_non_finite_step_stops_before_anything_is_saved():
  events = []
  trainer = FakeTrainer(events, nonfinite_at=21)
  controller, checkpointer = _controller(events, trainer=trainer,
                                         actions=[Recorder(events)])
  with pytest.raises(NonFiniteLossError) as error:
    controller.run()
  assert error.value.exit_status == 3
  assert "not finite at step 21" in str(error.value)
  assert "the last good checkpoint is ckpt-16" in str(error.value)
  assert checkpointer.saved == [16]
  # Nothing after the failing call: no action saw it, no commit, no save.
  failing = events.index(("train", 16, 8))
  assert [e[0] for e in events[failing + 1:]] == ["action_close"]


def test_a_non_finite_step_goes_on_when_not_stopping():
  events = []
  trainer = FakeTrainer(events, nonfinite_at=21)
  controller, checkpointer = _controller(events, trainer=trainer)
  controller.stop_on_nonfinite = False
  controller.run()
  assert checkpointer.saved == [16, 32, 48]


@pytest.mark.parametrize("signal_name,line,status", [
    ("SIGTERM", "stopped by SIGTERM at step 24/48", 143),
    ("SIGINT", "interrupted at step 24/48", 130)])
def test_a_stop_request_saves_the_current_step_then_raises(signal_name, line,
                                                          status):
  events = []
  requests = iter([None, None, signal_name])
  controller, checkpointer = _controller(
      events, actions=[Recorder(events)],
      stop_requested=lambda: next(requests))
  with pytest.raises(Preempted) as stopped:
    controller.run()
  assert stopped.value.step == 24 and stopped.value.checkpoint == "ckpt-24"
  assert stopped.value.exit_status == status
  assert checkpointer.saved == [16, 24]
  save = events.index(("save", 24))
  assert events[save - 1] == ("commit",) and events[save + 1] == ("close",)
  assert [e for e in events if e[0] == "log"][-1][1] == (
      f"{line}; checkpoint saved; run the same command to resume")
  assert ("at_end", 24) not in events and events[-1] == ("action_close",)


def test_no_stop_is_asked_after_the_last_step():
  events = []
  asked = []
  controller, _ = _controller(events, stop_requested=lambda: asked.append(1))
  controller.run()
  assert len(asked) == 5  # After each of the 6 calls but the last.


@pytest.mark.parametrize("settings,message", [
    (dict(total_steps=0), "total_steps must be >= 1"),
    (dict(steps_per_loop=0), "steps_per_loop must be >= 1"),
    (dict(eval_every_steps=-1), "eval_every_steps must be >= 0"),
])
def test_an_impossible_cadence_is_refused(settings, message):
  full = dict(total_steps=48, steps_per_loop=8, steps_per_epoch=16)
  full.update(settings)
  with pytest.raises(ValueError, match=message):
    Cadence(**full)
