"""Choosing and creating the ``tf.distribute`` strategy.

``configure_devices`` must run before TensorFlow initializes its devices (the
first op or device query), because logical CPU devices can only be declared
then. ``create_strategy`` is then called before any other TensorFlow op.
"""

from __future__ import annotations

import itertools
import json
import os

import tensorflow as tf

from research import data as data_lib
from research.errors import UserError
from research.options import STRATEGIES


def configure_devices(*, cpu_replicas: int = 0, num_gpus: int | None = None,
                      gpu_memory_growth: bool = False) -> None:
  """Chooses the devices this process uses, before TensorFlow starts them.

  Splits the CPU into ``cpu_replicas`` logical devices, so that multi-replica
  code (``MirroredStrategy``) runs on a machine with no GPU: each logical
  device is one replica. Hides every GPU past the first ``num_gpus`` from
  TensorFlow (trimming a strategy's device list alone would leave the others
  visible, and TensorFlow would take their memory too). With
  ``gpu_memory_growth``, TensorFlow takes GPU memory as it needs it instead
  of all of it at start, so that several processes can share a GPU.

  Args:
    cpu_replicas: Number of logical CPU devices; 0 or 1 leaves the CPU as is.
    num_gpus: Use at most this many GPUs (None: all visible).
    gpu_memory_growth: Grow GPU memory on demand.

  Raises:
    ValueError: if ``cpu_replicas`` < 0 or ``num_gpus`` < 0.
    UserError: if TensorFlow already initialized its devices.
  """
  if cpu_replicas < 0:
    raise ValueError(f"cpu_replicas must be >= 0, got {cpu_replicas}")
  if num_gpus is not None and num_gpus < 0:
    raise ValueError(f"num_gpus must be >= 0, got {num_gpus}")
  gpus = tf.config.list_physical_devices("GPU")
  try:
    if num_gpus is not None and num_gpus < len(gpus):
      gpus = gpus[:num_gpus]
      tf.config.set_visible_devices(gpus, "GPU")
    if gpu_memory_growth:
      for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
  except RuntimeError as e:
    raise UserError(f"cannot choose the GPUs after TensorFlow initialized "
                    f"them ({e})") from None
  if cpu_replicas <= 1:
    return
  cpu = tf.config.list_physical_devices("CPU")[0]
  wanted = [tf.config.LogicalDeviceConfiguration()] * cpu_replicas
  if tf.config.get_logical_device_configuration(cpu) == wanted:
    return  # Already split so (a second run in the same process).
  try:
    tf.config.set_logical_device_configuration(cpu, wanted)
  except RuntimeError as e:
    raise UserError(f"cannot split the CPU into {cpu_replicas} devices after "
                    f"TensorFlow initialized ({e})") from None


# Each MirroredStrategy numbers its collectives from group key 1 + this
# base. With the same base for all (TensorFlow's default), a second strategy
# in one process that all-reduces a tensor of another shape or dtype under a
# key the first one used fails ("Shape mismatch in the collective instance
# 100"), e.g. two runs of different models in a notebook. TensorFlow gives
# the base no public setter (its own tests set this class attribute).
_COLLECTIVE_KEY_BASES = itertools.count(0, 10_000)


def mirrored_strategy(devices) -> tf.distribute.MirroredStrategy:
  """A ``MirroredStrategy`` over ``devices`` whose collective keys no other
  strategy of this process uses."""
  cls = tf.distribute.MirroredStrategy
  cls._collective_key_base = next(_COLLECTIVE_KEY_BASES)  # pylint: disable=protected-access
  try:
    return cls(list(devices))
  finally:
    cls._collective_key_base = 0  # pylint: disable=protected-access


def create_strategy(name: str = "auto", *, num_gpus: int | None = None,
                    cpu_replicas: int = 0, tpu: str = ""
                    ) -> tf.distribute.Strategy:
  """Creates a distribution strategy.

  Args:
    name: One of ``STRATEGIES``. ``auto``: ``MirroredStrategy`` over all
      visible GPUs when there are two or more (or over the logical CPUs when
      ``cpu_replicas`` > 1), ``OneDeviceStrategy`` on the one GPU or the CPU
      otherwise.
    num_gpus: Use at most this many GPUs (None: all visible).
    cpu_replicas: Logical CPU devices made by ``configure_devices``; with no
      GPUs, ``mirrored`` and ``auto`` mirror over them.
    tpu: TPU name or address for the ``tpu`` strategy.

  Returns:
    The strategy.

  Raises:
    UserError: for an unknown name, or a strategy this machine cannot run.
  """
  if name not in STRATEGIES:
    raise UserError(f"unknown strategy {name!r}; choose one of "
                    f"{', '.join(STRATEGIES)}")
  # These two must come before anything initializes TensorFlow's devices
  # (listing logical devices does).
  if name == "multi_worker_mirrored":
    return _multi_worker_strategy(cpu_replicas)
  if name == "tpu":
    return _tpu_strategy(tpu)
  gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
  if num_gpus is not None:
    gpus = gpus[:num_gpus]
  cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
  if cpu_replicas > 1 and not gpus:
    replica_devices = cpus[:cpu_replicas]
  else:
    replica_devices = gpus

  if name == "one_device":
    return tf.distribute.OneDeviceStrategy(gpus[0] if gpus else cpus[0])
  if name == "mirrored":
    return mirrored_strategy(replica_devices or cpus[:1])
  # auto
  if len(replica_devices) >= 2:
    return mirrored_strategy(replica_devices)
  return tf.distribute.OneDeviceStrategy(gpus[0] if gpus else cpus[0])


def _tf_config() -> dict:
  """The parsed ``TF_CONFIG`` environment variable ({} when unset).

  Raises:
    UserError: if it is set but not a JSON object.
  """
  text = os.environ.get("TF_CONFIG", "")
  try:
    config = json.loads(text) if text.strip() else {}
  except ValueError as e:
    config = e
  if not isinstance(config, dict):
    raise UserError(f"TF_CONFIG is not a JSON object ({config}): fix it "
                    f"(see BUILD.md) or unset it") from None
  return config


def _multi_worker_strategy(cpu_replicas: int) -> tf.distribute.Strategy:
  """``MultiWorkerMirroredStrategy`` over the cluster in ``TF_CONFIG``."""
  _tf_config()  # TensorFlow's resolver fails on bad JSON with a traceback.
  resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
  cluster = resolver.cluster_spec().as_dict()
  if not cluster:
    raise UserError(
        "--strategy=multi_worker_mirrored needs TF_CONFIG describing the "
        "cluster (see BUILD.md), or use scripts/launch_local.py")
  if cpu_replicas > 1:
    # TensorFlow's collective strategy uses exactly one CPU device per
    # worker when there is no GPU (collective_all_reduce_strategy.py,
    # _initialize_local_devices), so logical CPUs cannot be replicas here.
    raise UserError(
        "--cpu_replicas > 1 is not supported with "
        "--strategy=multi_worker_mirrored: TensorFlow uses one CPU device per "
        "worker; start more workers instead")
  return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)


def _tpu_strategy(tpu: str) -> tf.distribute.Strategy:
  """``TPUStrategy`` on the TPU named by ``tpu`` (untested here: no TPU)."""
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
  except (ValueError, tf.errors.OpError) as e:
    raise UserError(f"cannot reach a TPU (--tpu={tpu!r}): "
                    f"{data_lib.describe_error(e)}") from None
  return tf.distribute.TPUStrategy(resolver)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes the run's outputs (summaries, checkpoints).

  True for single-process strategies; under multi-worker, true only for the
  chief (or worker 0 when the cluster has no chief).
  """
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  if task_type == "chief":
    return True
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  return task_type == "worker" and task_id == 0 and not has_chief


def describe(strategy: tf.distribute.Strategy) -> str:
  """A one-line description, e.g. ``MirroredStrategy x2 (/cpu:0, /cpu:1)``.

  Raises:
    UserError: if ``TF_CONFIG`` is set but not a JSON object.
  """
  devices = getattr(strategy.extended, "worker_devices", ())
  task = _tf_config().get("task")
  where = (f" task={task.get('type')}:{task.get('index')}"
           if isinstance(task, dict) else "")
  return (f"{type(strategy).__name__} x{strategy.num_replicas_in_sync} "
          f"({', '.join(devices)}){where}")


def device_type(strategy: tf.distribute.Strategy) -> str:
  """The replicas' device type: ``"CPU"``, ``"GPU"`` or ``"TPU"``."""
  try:
    first = strategy.extended.worker_devices[0]
  except RuntimeError:
    # The default strategy has no device list: it runs where TensorFlow
    # places ops, on the first GPU if there is one.
    return "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
  return tf.DeviceSpec.from_string(first).device_type or "CPU"


def preprocesses_on_device(strategy: tf.distribute.Strategy) -> bool:
  """Whether the step, not the input pipeline, turns pixels into floats
  (and augments them): on accelerators.

  There, the uint8 pixels cross to the device, a quarter of the float32
  bytes, and the cast and augmentation run beside the step's own work. On
  CPUs nothing crosses, and the pipeline's threads do that work in parallel
  with the step instead of in it.
  """
  return device_type(strategy) != "CPU"


def compiles_updates_in_xla(strategy: tf.distribute.Strategy) -> bool:
  """Whether the optimizer's update may run inside an XLA cluster under
  ``strategy``: only with one replica and no mirrored variables.

  Under ``MirroredStrategy`` (even with one replica) and
  ``MultiWorkerMirroredStrategy``, a variable update inside XLA on GPUs
  takes TensorFlow's path without ``merge_call``, where Keras' optimizer
  calls ``extended.update`` in replica context and fails (tf-keras#385,
  keras#21366); on CPU the same code takes the ``merge_call`` path, so CPU
  runs cannot show it. The step then compiles only the forward and backward
  pass, where the FLOPs are.
  """
  mirrored = (tf.distribute.MirroredStrategy,
              tf.distribute.MultiWorkerMirroredStrategy)
  return (strategy.num_replicas_in_sync == 1 and
          not isinstance(strategy, mirrored))


def auto_jit_compile(*, device_type: str, replicas: int,
                     updates_in_xla: bool, deterministic: bool) -> bool:
  """The rule ``--jit_compile=auto`` follows, in one place.

  XLA is on only for one replica on a GPU whose whole step XLA can compile
  (``OneDeviceStrategy``), without op determinism. Keras' own ``auto`` is
  off on CPU-only machines, under any ``tf.distribute`` strategy, and with
  op determinism (keras/src/trainers/trainer.py); ours differs in one case,
  a single GPU under ``OneDeviceStrategy``, where the loop's step compiles
  whole and is faster.

  Args:
    device_type: The replicas' device type (``"GPU"``, ``"CPU"``, ...).
    replicas: Replicas in sync.
    updates_in_xla: ``compiles_updates_in_xla`` of the strategy.
    deterministic: Op determinism is on (TensorFlow has no deterministic
      XLA MaxPool gradient).

  Returns:
    Whether to compile the steps with XLA.
  """
  return (device_type == "GPU" and replicas == 1 and updates_in_xla and
          not deterministic)


def resolve_jit_compile(setting: str, strategy: tf.distribute.Strategy, *,
                        deterministic: bool) -> bool:
  """``--jit_compile`` (``auto``, ``true`` or ``false``) for ``strategy``.

  Raises:
    UserError: if XLA is asked for (``true``) where it cannot run: with
      ``deterministic``, or over several logical CPUs.
  """
  if setting == "auto":
    return auto_jit_compile(
        device_type=device_type(strategy),
        replicas=strategy.num_replicas_in_sync,
        updates_in_xla=compiles_updates_in_xla(strategy),
        deterministic=deterministic)
  if setting != "true":
    return False
  if deterministic:
    raise UserError("--deterministic cannot be combined with XLA "
                    "(--jit_compile=true): TensorFlow has no deterministic "
                    "XLA MaxPool gradient; pass --jit_compile=false or auto")
  refuse_xla_over_cpus(device_type(strategy), strategy.num_replicas_in_sync)
  return True


# /proc/cpuinfo flags of x86 CPUs that compute in bfloat16 natively.
NATIVE_BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bfloat16(cpuinfo: str | None = None) -> bool | None:
  """Whether this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX).

  Without either, oneDNN converts to float32 and back around every
  bfloat16 convolution and matmul, and ``mixed_bfloat16`` trains slower
  than ``float32`` (BENCHMARKS.md, "Precision").

  Args:
    cpuinfo: ``/proc/cpuinfo``'s text (default: read it).

  Returns:
    True or False, or None where it cannot be told (no ``/proc/cpuinfo``,
    or a CPU that reports no x86 flags).
  """
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpuinfo = f.read()
    except OSError:
      return None
  flags = set()
  for line in cpuinfo.splitlines():
    name, _, value = line.partition(":")
    if name.strip() == "flags":
      flags.update(value.split())
  if not flags:
    return None
  return any(flag in flags for flag in NATIVE_BFLOAT16_CPU_FLAGS)


def refuse_xla_over_cpus(device_type: str, replicas: int) -> None:
  """Refuses XLA over several logical CPU replicas.

  Raises:
    UserError: if ``device_type`` is CPU and ``replicas`` > 1 (an XLA
      cluster cannot use variables of another logical CPU).
  """
  if device_type == "CPU" and replicas > 1:
    raise UserError("--jit_compile with several CPU replicas is not "
                    "supported by TensorFlow (an XLA cluster cannot use "
                    "variables of another logical CPU); use it with one "
                    "replica, or on GPUs")
