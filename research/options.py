"""Names of the fixed choices the library accepts.

Importable without TensorFlow, so scripts can define and validate their flags
(and report a bad one) before TensorFlow loads. Models and datasets are not
listed here: they are registries (``model.MODELS``, ``data.DATASETS``) that
grow by registration.
"""

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
JIT_COMPILE = ("auto", "true", "false")
FAULTS = ("none", "unscaled_loss", "unscaled_regularization")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "step", "exponential")
NAN_POLICIES = ("stop", "skip")
# The evaluation sets every dataset can have; a data source may add more
# (``data.ArrayData.extra_eval_sets``), named by EVAL_SET_NAME_PATTERN and
# none of RESERVED_RUN_NAMES (a set is a TensorBoard run of the run folder).
EVAL_SETS = ("validation", "test")
EVAL_SET_NAME_PATTERN = r"[a-z][a-z0-9_]{0,63}"
RESERVED_RUN_NAMES = ("train", "evaluator", "checkpoints", "best", "export",
                      "plugins")
# Metrics every evaluation reports, and whether larger is better (model
# selection: --best_metric=SET/METRIC).
METRIC_DIRECTIONS = {"accuracy": "max", "loss": "min", "nll": "min",
                     "brier": "min", "ece": "min"}


def split_metric(metric: str) -> tuple[str, str]:
  """``"validation/accuracy"`` -> ``("validation", "accuracy")``.

  Raises:
    ValueError: if it is not ``SET/METRIC`` with a METRIC of
      ``METRIC_DIRECTIONS`` (whether SET exists depends on the data).
  """
  set_name, _, name = metric.partition("/")
  if not set_name or name not in METRIC_DIRECTIONS:
    raise ValueError(f"best_metric must be SET/METRIC with METRIC one of "
                     f"{tuple(METRIC_DIRECTIONS)}, got {metric!r}")
  return set_name, name


# An image may claim at most this many pixels (height x width) in its header.
# Decoding allocates height x width x channels bytes before it reads any
# pixel data, so a file of a few kilobytes whose header claims 30000x30000
# (a decompression bomb) would take 2.7 GB. 4096x4096 (48 MB as RGB) is far
# above any training image; raise it with load_image_folder's
# max_image_pixels (the folder source reads
# DataConfig.max_image_pixels, --max_image_pixels).
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
# 128 + SIGTERM and 128 + SIGINT, as a shell reports processes ended by
# them: the exit statuses of a run that saved a checkpoint and stopped
# (research.preemption; scripts/launch_local.py passes them on). Schedulers
# such as Kubeflow's TFJob (restartPolicy: ExitCode) treat 128-255 as
# retryable, so the job is restarted and resumes from the checkpoint.
PREEMPTED_EXIT_STATUS = 143
INTERRUPTED_EXIT_STATUS = 130

# CIFAR ResNets (research/resnet.py) have 6n + 2 layers, n >= 1 blocks a
# stage; the paper's depths are 20, 32, 44, 56 and 110.
RESNET_DEPTH_RULE = "6n+2 with n >= 1 (20, 32, 44, 56, 110, ...)"


def is_resnet_depth(depth: int) -> bool:
  """Whether ``depth`` follows ``RESNET_DEPTH_RULE``."""
  return depth >= 8 and (depth - 2) % 6 == 0
