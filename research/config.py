"""The configuration of a training run: a small tree of frozen dataclasses.

``TrainConfig`` groups the settings by what they govern: the data, the model,
the optimizer, the step, the loop's cadence and the reporting. Each part checks
its own values in ``__post_init__``, so an impossible configuration cannot be
built. ``from_flat`` builds the tree from flat ``name -> value`` pairs (the
flags, by field name); ``to_flat`` goes back (the HParams of a run).

Importable without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from research import options

# Fields whose flag has another name: (part, field) -> flag.
FLAG_NAMES = {("model", "name"): "model", ("optimizer", "name"): "optimizer"}


def _at_least(part, minimum: float, *names: str) -> None:
  for name in names:
    value = getattr(part, name)
    if value < minimum:
      raise ValueError(f"{name} must be >= {minimum:g}, got {value}")


def _one_of(part, name: str, choices) -> None:
  value = getattr(part, name)
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def is_eval_set_name(name: str) -> bool:
  """Whether ``name`` can name an evaluation set (``options``' rule)."""
  return (isinstance(name, str) and
          re.fullmatch(options.EVAL_SET_NAME_PATTERN, name) is not None and
          name not in options.RESERVED_RUN_NAMES)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the examples come from.

  Attributes:
    dataset: A name registered in ``data.DATASETS``.
    data_dir: Folder to read from (what it holds depends on the dataset).
    synthetic_train_size: ``synthetic``: training examples.
    synthetic_test_size: ``synthetic``: test examples.
    resize_images: ``folder``: ``(height, width)`` to resize every image to.
    augment: Random crop (4-pixel padding) and horizontal flip in training.
    cutout: With ``augment``, also zero a ``cutout`` x ``cutout`` square of
      each training image, its center uniform over the image (clipped at
      the borders; DeVries and Taylor 2017); 0 for none.
    max_image_pixels: ``folder``: refuse an image whose header claims more
      pixels (height x width), before decoding it (a decompression bomb).
    validation_size: Training examples held out as the ``validation`` set
      (``data.split_validation``: stratified, the same for every seed);
      0 for none.
  """
  dataset: str = "cifar10"
  data_dir: str | None = None
  synthetic_train_size: int = 1024
  synthetic_test_size: int = 256
  resize_images: tuple[int, int] | None = None
  augment: bool = False
  cutout: int = 0
  max_image_pixels: int = options.DEFAULT_MAX_IMAGE_PIXELS
  validation_size: int = 0

  def __post_init__(self):
    _at_least(self, 1, "synthetic_train_size", "synthetic_test_size",
              "max_image_pixels")
    _at_least(self, 0, "validation_size", "cutout")
    if self.cutout and not self.augment:
      raise ValueError("cutout is part of the training augmentation: it "
                       "needs augment (--augment)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Which network, and its hyper-parameters.

  Attributes:
    name: A name registered in ``model.MODELS``.
    l2: Kernel L2 regularization factor of every conv and dense layer.
    dropout: Dropout rate (ConvNet: before each dense layer; ResNet: before
      the classifier); 0: none.
    resnet_depth: ``resnet``: ``6n + 2`` layers.
    sync_batch_norm: Batch-norm statistics over the global batch (all
      replicas); None: when there is more than one replica
      (``model.resolve_sync_batch_norm``).
    fused_batch_norm: Batch norm trains on TensorFlow's fused kernel where
      its statistics are not synchronized (``layers.FusedBatchNormalization``:
      the same math, faster, other float rounding).
    flip_average: Predict with the mean of the logits of each image and its
      left-right mirror (test-time augmentation), in every evaluation and
      in the export (``model.inference_logits``); training is unchanged.
    shift_average: As ``flip_average``, also over the image translated by
      this many pixels up, down, left and right (0: not).
  """
  name: str = "convnet"
  l2: float = 0.0
  dropout: float = 0.0
  resnet_depth: int = 20
  sync_batch_norm: bool | None = None
  fused_batch_norm: bool = False
  flip_average: bool = False
  shift_average: int = 0

  def __post_init__(self):
    _at_least(self, 0, "l2", "dropout", "shift_average")
    if self.dropout >= 1:
      raise ValueError(f"dropout must be < 1, got {self.dropout}")
    if not options.is_resnet_depth(self.resnet_depth):
      raise ValueError(f"resnet_depth must be {options.RESNET_DEPTH_RULE}, "
                       f"got {self.resnet_depth}")

  def with_test_time_augmentation(self, *, flip_average: bool | None = None,
                                  shift_average: int | None = None
                                  ) -> ModelConfig:
    """This model predicting with (True) or without (False) flip
    averaging and with another ``shift_average``; None: as it is (how
    ``evaluate.py`` and ``export.py`` override a run's choice)."""
    changes = {name: value for name, value in (
        ("flip_average", flip_average), ("shift_average", shift_average))
               if value is not None}
    return dataclasses.replace(self, **changes)

  @property
  def test_time_augmentation(self) -> dict[str, Any]:
    """``model.inference_logits``' keyword arguments for this model."""
    return {"flip_average": self.flip_average,
            "shift_average": self.shift_average}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer and its learning-rate schedule (see ``optim``).

  Attributes:
    name: ``adam``, ``adamw`` or ``sgd``.
    learning_rate: Base (peak) rate. With a constant schedule the configured
      value wins over a restored one.
    weight_decay: Decoupled weight decay (0: none).
    momentum: SGD momentum.
    nesterov: SGD with Nesterov momentum.
    lr_schedule: ``constant``, ``cosine``, ``step`` or ``exponential``, over
      the run's total steps.
    warmup_steps: Linear warmup steps.
    lr_decay_rate: ``step``/``exponential`` decay factor.
    lr_decay_steps: Steps per ``lr_decay_rate`` (0: see ``optim``).
    ema_decay: Keep an exponential moving average of the weights with this
      decay (0: none); evaluation, selection and export use it.
  """
  name: str = "adam"
  learning_rate: float = 0.001
  weight_decay: float = 0.0
  momentum: float = 0.9
  nesterov: bool = False
  lr_schedule: str = "constant"
  warmup_steps: int = 0
  lr_decay_rate: float = 0.1
  lr_decay_steps: int = 0
  ema_decay: float = 0.0

  def __post_init__(self):
    _one_of(self, "name", options.OPTIMIZERS)
    _one_of(self, "lr_schedule", options.LR_SCHEDULES)
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
    _at_least(self, 0, "weight_decay", "warmup_steps", "lr_decay_steps")
    if not 0 <= self.momentum < 1:
      raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
    if not 0 < self.lr_decay_rate <= 1:
      raise ValueError(f"lr_decay_rate must be in (0, 1], got "
                       f"{self.lr_decay_rate}")
    if not 0 <= self.ema_decay < 1:
      raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """How one training step is computed (see ``steps.StepRunner``).

  Attributes:
    global_batch_size: Examples per step over all replicas.
    keep_short_batch: Keep each epoch's last short batch; its loss is the
      mean over the examples it has.
    mixed_precision: Keras dtype policy: ``float32``, ``mixed_float16``
      (with a ``LossScaleOptimizer``) or ``mixed_bfloat16``.
    jit_compile: Compile the steps with XLA.
    nan_policy: ``stop`` or ``skip`` a step whose loss or gradient is not
      finite.
    label_smoothing: Smoothing of the training targets.
    clip_grad_norm: Clip the global gradient to this L2 norm (0: off).
  """
  global_batch_size: int = 32
  keep_short_batch: bool = False
  mixed_precision: str = "float32"
  jit_compile: bool = False
  nan_policy: str = "stop"
  label_smoothing: float = 0.0
  clip_grad_norm: float = 0.0

  def __post_init__(self):
    _at_least(self, 1, "global_batch_size")
    _at_least(self, 0, "clip_grad_norm")
    _one_of(self, "mixed_precision", options.PRECISIONS)
    _one_of(self, "nan_policy", options.NAN_POLICIES)
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f"label_smoothing must be in [0, 1), got "
                       f"{self.label_smoothing}")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """The cadence of the run (see ``controller``).

  Attributes:
    epochs: Passes over the training set.
    steps_per_loop: Training steps per ``tf.function`` call.
    eval_every_steps: Also evaluate every this many steps (0: epochs only).
    checkpoint_every_steps: Save every this many steps (0: only at the end).
    keep_checkpoints: Newest checkpoints to keep.
    eval_sets: The sets evaluated during training (``options.EVAL_SETS``);
      none: no evaluation during training (a sidecar evaluator's job).
    final_eval_sets: The sets evaluated once after the last step (with
      those of ``eval_sets`` at that step); may be none.
    best_metric: ``SET/METRIC`` (e.g. ``validation/accuracy``, a set of
      ``eval_sets``) whose best evaluation is kept in ``best/`` and
      exported; None for no selection.
    early_stopping_patience: Stop after this many evaluations without an
      improvement of ``best_metric`` (0: never).
    early_stopping_min_delta: The improvement that counts.
  """
  epochs: int = 10
  steps_per_loop: int = 100
  eval_every_steps: int = 0
  checkpoint_every_steps: int = 1000
  keep_checkpoints: int = 3
  eval_sets: tuple[str, ...] = ("test",)
  final_eval_sets: tuple[str, ...] = ("test",)
  best_metric: str | None = None
  early_stopping_patience: int = 0
  early_stopping_min_delta: float = 0.0

  def __post_init__(self):
    _at_least(self, 1, "epochs", "steps_per_loop", "keep_checkpoints")
    _at_least(self, 0, "eval_every_steps", "checkpoint_every_steps")
    for name in ("eval_sets", "final_eval_sets"):
      # Which sets exist depends on the data: train.train checks that.
      sets = getattr(self, name)
      if len(set(sets)) != len(sets) or not all(
          is_eval_set_name(s) for s in sets):
        raise ValueError(f"{name} must be distinct set names (validation, "
                         f"test, or one the dataset adds), got {tuple(sets)}")
    _at_least(self, 0, "early_stopping_patience", "early_stopping_min_delta")
    if self.best_metric is not None:
      set_name, _ = options.split_metric(self.best_metric)
      if set_name not in self.eval_sets:
        raise ValueError(f"best_metric {self.best_metric!r} needs the set "
                         f"{set_name!r} evaluated during training; eval_sets "
                         f"is {self.eval_sets}")
    elif self.early_stopping_patience:
      raise ValueError("early_stopping_patience needs a best_metric to "
                       "watch, e.g. validation/accuracy")


@dataclasses.dataclass(frozen=True)
class ReportingConfig:
  """What the run shows and leaves behind besides checkpoints.

  Attributes:
    histogram_every_steps: Weight and gradient histograms period (0: off).
    eval_images: Images of each evaluated set shown with predictions after
      each evaluation.
    profile_steps: ``(first, last)`` global steps to trace, or None.
    export: Write a serving SavedModel to ``<model_dir>/export`` at the end.
  """
  histogram_every_steps: int = 0
  eval_images: int = 24
  profile_steps: tuple[int, int] | None = None
  export: bool = True

  def __post_init__(self):
    _at_least(self, 0, "histogram_every_steps", "eval_images")
    if self.profile_steps is not None and not (
        1 <= self.profile_steps[0] <= self.profile_steps[1]):
      raise ValueError(f"profile_steps must be FIRST,LAST with 1 <= FIRST <= "
                       f"LAST, got {self.profile_steps}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that defines a training run.

  Attributes:
    model_dir: Run directory: event files, checkpoints, metrics.json.
    seed: Seed of initialization, data order and augmentation (and of the
      synthetic data).
    deterministic: Op determinism: two runs of the same configuration give
      bitwise-identical weights.
    data, model, optimizer, step, loop, reporting: The parts.
  """
  model_dir: str
  seed: int = 0
  deterministic: bool = False
  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  step: StepConfig = StepConfig()
  loop: LoopConfig = LoopConfig()
  reporting: ReportingConfig = ReportingConfig()

  def __post_init__(self):
    wanted = set(self.loop.eval_sets) | set(self.loop.final_eval_sets)
    if "validation" in wanted and not self.data.validation_size:
      raise ValueError("the validation set is evaluated but validation_size "
                       "is 0: hold examples out with validation_size")
    if self.deterministic and self.step.jit_compile:
      raise ValueError("deterministic and jit_compile cannot both be on: "
                       "TensorFlow has no deterministic XLA MaxPool gradient")

  def to_json(self) -> dict:
    """The tree as nested dicts (``config.json``)."""
    return dataclasses.asdict(self)


_PART_TYPES = {"data": DataConfig, "model": ModelConfig,
               "optimizer": OptimizerConfig, "step": StepConfig,
               "loop": LoopConfig, "reporting": ReportingConfig}
_TOP_LEVEL = ("model_dir", "seed", "deterministic")


def default_eval_sets(validation_size: int
                      ) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """``(eval_sets, final_eval_sets)`` when none are given: with a
  validation split, validation during training and the test set once at
  the end; without one, the test set throughout (the seed's
  ``fit(validation_data=test)``)."""
  if validation_size:
    return ("validation",), ("validation", "test")
  return ("test",), ("test",)


def _flat_name(part: str, field: str) -> str:
  return FLAG_NAMES.get((part, field), field)


def flat_names(part: str) -> tuple[str, ...]:
  """The flat names (as the flags are called) of ``part``'s fields."""
  return tuple(_flat_name(part, f.name)
               for f in dataclasses.fields(_PART_TYPES[part]))


def check_flat_value(part: str, name: str, value: Any) -> None:
  """Checks one value of ``part`` given by its flat name, alone (the other
  fields at their defaults): the part's own rules, before anything runs.

  Raises:
    ValueError: for an invalid value, as the part says it.
  """
  part_from_flat(part, {name: value})


def part_from_flat(part: str, values: Mapping[str, Any]):
  """Builds one part (``"optimizer"``, ...) from flat values by field name.

  Missing names keep their defaults; other names are ignored.

  Raises:
    ValueError: for an invalid value.
  """
  part_type = _PART_TYPES[part]
  return part_type(**{
      f.name: values[_flat_name(part, f.name)]
      for f in dataclasses.fields(part_type)
      if _flat_name(part, f.name) in values})


def from_flat(values: Mapping[str, Any], *, strict: bool = True
              ) -> TrainConfig:
  """Builds a ``TrainConfig`` from flat ``name -> value`` pairs.

  Each field takes the value of the same name (``model.name`` and
  ``optimizer.name`` are ``model`` and ``optimizer``, as the flags are
  called); missing names keep their defaults.

  Args:
    values: Flat values, e.g. the flags' values with the resolved ones
      (``global_batch_size``, ``jit_compile``, ...) added.
    strict: Refuse names that are no field (off for flags, which also hold
      settings that are not part of the run, such as ``--strategy``).

  Returns:
    The validated configuration.

  Raises:
    ValueError: for a missing ``model_dir``, an unknown name (when strict)
      or an invalid value.
  """
  if "model_dir" not in values:
    raise ValueError("model_dir is required")
  if strict:
    unknown = set(values) - set(to_flat(TrainConfig(model_dir="")))
    if unknown:
      raise ValueError(f"not configuration fields: {sorted(unknown)}")
  return TrainConfig(
      **{name: values[name] for name in _TOP_LEVEL if name in values},
      **{part: part_from_flat(part, values) for part in _PART_TYPES})


def from_json(payload: Mapping[str, Any]) -> TrainConfig:
  """The configuration that ``TrainConfig.to_json`` wrote (a run's
  ``config.json``); fields it lacks take their defaults.

  Raises:
    ValueError: for an invalid value.
  """
  flat = {name: payload[name] for name in _TOP_LEVEL if name in payload}
  for part in _PART_TYPES:
    for field, value in (payload.get(part) or {}).items():
      flat[_flat_name(part, field)] = value
  return from_flat(flat, strict=False)


def to_flat(config: TrainConfig) -> dict[str, Any]:
  """The configuration as flat ``name -> value`` pairs (``from_flat``'s
  inverse)."""
  flat = {name: getattr(config, name) for name in _TOP_LEVEL}
  for part in _PART_TYPES:
    for field, value in dataclasses.asdict(getattr(config, part)).items():
      flat[_flat_name(part, field)] = value
  return flat
