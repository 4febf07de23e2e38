"""Data sources and the ``tf.data`` input pipeline.

Sources (the ``DATASETS`` registry, read by ``load``) return an
``ArrayData``: uint8 images and int32 labels held in memory. CIFAR-10 is 150 MB
as uint8, so decoding once and keeping the arrays is the cache; every epoch
after that only gathers and converts. Adding a source is one function and one
``register_dataset`` line.

The pipeline works on *indices*. Each epoch's order is a stateless shuffle of
``range(n)`` keyed by ``(seed, epoch)``, and augmentation draws are keyed by
``(seed, global_step)``. So the batch at any global step is a pure function of
the seed and the step: a resumed run rebuilds exactly the input it would have
seen, by starting at the right epoch and skipping the consumed batches, without
checkpointing iterator state.

Each global batch is split into consecutive per-replica slices in replica order
(worker 0's replicas first), which is also how ``model.fit`` splits a global
batch under a strategy. Every worker's pipeline yields one slice per local
replica per step, in round-robin order, as
``strategy.distribute_datasets_from_function`` expects.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from typing import Callable

import numpy as np
import tensorflow as tf

from research.config import DataConfig
from research.errors import UserError
from research.registry import Registry

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                   "frog", "horse", "ship", "truck")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CROP_PADDING = 4


@dataclasses.dataclass(frozen=True)
class ArrayData:
  """A whole dataset in memory.

  Attributes:
    train_images: uint8 array ``[N, H, W, C]``.
    train_labels: int32 array ``[N]`` with values in ``[0, num_classes)``.
    test_images: uint8 array ``[M, H, W, C]``.
    test_labels: int32 array ``[M]``.
    class_names: One name per label id.
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])


# --------------------------------------------------------------------------
# Sources.


# (config, *, seed) -> ArrayData.
DataSource = Callable[..., ArrayData]

DATASETS: Registry[DataSource] = Registry("dataset")


def register_dataset(name: str, load: DataSource) -> None:
  """Makes ``--dataset=name`` load its data with ``load(config, seed=...)``.

  ``load`` gets the run's ``DataConfig`` and seed and returns an
  ``ArrayData``; it raises ``UserError`` for data that is missing or
  malformed.

  Raises:
    ValueError: if the name is taken or malformed.
  """
  DATASETS.register(name, load)


def load(config: DataConfig, *, seed: int = 0) -> ArrayData:
  """Loads the registered dataset ``config.dataset``.

  Args:
    config: Which dataset and where it is.
    seed: The run's seed (synthetic data is drawn with it).

  Returns:
    The dataset as an ``ArrayData``.

  Raises:
    UserError: for an unknown name, or data that is missing or malformed.
  """
  return DATASETS.get(config.dataset)(config, seed=seed)


class _BatchFileUnpickler(pickle.Unpickler):
  """Admits only what CIFAR-10 batch files hold: containers and numpy arrays.

  ``find_class`` is the only way a pickle can reach code; refusing every other
  global means a crafted file cannot run anything.
  """
  _ALLOWED = {
      ("numpy", "ndarray"),
      ("numpy", "dtype"),
      ("numpy.core.multiarray", "_reconstruct"),
      ("numpy._core.multiarray", "_reconstruct"),
      # Protocol-2 pickles written by Python 3 spell bytes as
      # _codecs.encode(str, "latin1"): a pure conversion, runs no code.
      ("_codecs", "encode"),
  }

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(
        f"refusing to load {module}.{name}: batch files may hold only dicts, "
        f"lists, bytes, str, ints and numpy arrays")


def _read_batch_file(path: str) -> dict:
  """Reads one CIFAR-10 pickle with the restricted unpickler; str keys."""
  try:
    with open(path, "rb") as f:
      obj = _BatchFileUnpickler(f, encoding="bytes").load()
  except FileNotFoundError:
    raise UserError(f"CIFAR-10 batch file missing: {path}") from None
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
          AttributeError, IndexError, MemoryError) as e:
    raise UserError(f"CIFAR-10 batch file {path} is unreadable or unsafe "
                    f"({e}); re-download or re-extract it") from None
  if not isinstance(obj, dict):
    raise UserError(f"CIFAR-10 batch file {path} does not hold a dict")
  return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch_arrays(path: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  batch = _read_batch_file(path)
  try:
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
  except KeyError as e:
    raise UserError(f"CIFAR-10 batch file {path} has no {e} entry") from None
  if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
    raise UserError(
        f"CIFAR-10 batch file {path} is malformed: data shape {data.shape}, "
        f"{len(labels)} labels (want [n, 3072] and n labels)")
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    i = int(np.argmax(bad))
    raise UserError(f"CIFAR-10 batch file {path}: label {labels[i]} of example "
                    f"{i} is outside [0, {num_classes})")
  # Rows are channel-major (1024 R, 1024 G, 1024 B); make them HWC.
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int32)


def _find_cifar10_python_dir(data_dir: str) -> str:
  candidates = [data_dir, os.path.join(data_dir, "cifar-10-batches-py")]
  for d in candidates:
    if os.path.isfile(os.path.join(d, "data_batch_1")):
      return d
  raise UserError(
      f"no CIFAR-10 python batches in {data_dir} (looked for data_batch_1 in "
      f"{' and '.join(candidates)}); pass --data_dir=<folder holding "
      f"cifar-10-batches-py>")


def load_cifar10_python(data_dir: str) -> ArrayData:
  """Reads the official "CIFAR-10 python version" files.

  Args:
    data_dir: ``cifar-10-batches-py/`` itself or its parent.

  Returns:
    The dataset.

  Raises:
    UserError: if files are missing, malformed, unsafe or labels are out of
      range.
  """
  if os.path.isfile(data_dir):
    raise UserError(f"--data_dir={data_dir} is a file; pass the folder that "
                    f"holds cifar-10-batches-py")
  root = _find_cifar10_python_dir(data_dir)
  meta = os.path.join(root, "batches.meta")
  if os.path.exists(meta):
    names = tuple(n.decode() if isinstance(n, bytes) else str(n)
                  for n in _read_batch_file(meta).get("label_names", ()))
  else:
    names = CIFAR10_CLASSES
  if len(names) < 2:
    raise UserError(f"{meta} lists {len(names)} class names; need at least 2")
  parts = [_batch_arrays(os.path.join(root, f"data_batch_{i}"), len(names))
           for i in range(1, 6)]
  test_images, test_labels = _batch_arrays(
      os.path.join(root, "test_batch"), len(names))
  return ArrayData(
      train_images=np.concatenate([p[0] for p in parts]),
      train_labels=np.concatenate([p[1] for p in parts]),
      test_images=test_images, test_labels=test_labels, class_names=names)


def load_cifar10(data_dir: str | None = None) -> ArrayData:
  """Loads CIFAR-10 from ``data_dir``, or through Keras' download cache.

  Args:
    data_dir: Local copy (``cifar-10-batches-py/`` or its parent). When None,
      ``keras.datasets.cifar10.load_data()`` is used (it downloads once into
      ``~/.keras/datasets``).

  Returns:
    The dataset.

  Raises:
    UserError: if there is neither a local copy nor a working download.
  """
  if data_dir:
    return load_cifar10_python(data_dir)
  cache = os.path.join(os.path.expanduser("~"), ".keras", "datasets",
                       "cifar-10-batches-py")
  try:
    (x_train, y_train), (x_test, y_test) = tf.keras.datasets.cifar10.load_data()
  except Exception as e:  # Keras raises plain Exception on a failed download.
    raise UserError(
        f"CIFAR-10 is not available: no --data_dir given, nothing usable in "
        f"{cache}, and the download failed ({type(e).__name__}); pass "
        f"--data_dir=<folder holding cifar-10-batches-py> or use "
        f"--dataset=folder") from None
  return ArrayData(x_train, y_train.reshape(-1).astype(np.int32), x_test,
                   y_test.reshape(-1).astype(np.int32), CIFAR10_CLASSES)


def _list_split(root: str, split: str) -> tuple[list[str], dict[str, list[str]]]:
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise UserError(f"image folder {root} has no {split}/ subfolder; expected "
                    f"{split}/<class>/<image>.jpg")
  classes = sorted(d for d in os.listdir(split_dir)
                   if os.path.isdir(os.path.join(split_dir, d)))
  if not classes:
    raise UserError(f"{split_dir} has no class subfolders")
  files = {}
  for c in classes:
    cdir = os.path.join(split_dir, c)
    files[c] = sorted(os.path.join(cdir, f) for f in os.listdir(cdir)
                      if f.lower().endswith(_IMAGE_SUFFIXES))
    if not files[c]:
      raise UserError(f"class folder {cdir} holds no .jpg/.jpeg/.png images")
  return classes, files


def resize_uint8(image, size: tuple[int, int], *, antialias: bool = False):
  """Resizes uint8 pixels (bilinear) and rounds them back to uint8.

  Args:
    image: uint8 ``[H, W, C]`` (or a batch of them).
    size: ``(height, width)``.
    antialias: Filter when shrinking (for arbitrary user images).
  """
  resized = tf.image.resize(image, size, antialias=antialias)
  return tf.cast(tf.round(tf.clip_by_value(resized, 0, 255)), tf.uint8)


def _decode_images(paths: list[str], resize_to: tuple[int, int] | None
                   ) -> np.ndarray:
  """Decodes image files in parallel into one uint8 array ``[n, H, W, 3]``.

  Without ``resize_to`` every image must have the first image's size.
  """
  first = tf.io.decode_image(tf.io.read_file(paths[0]), channels=3,
                             expand_animations=False)
  target = tuple(resize_to) if resize_to else tuple(first.shape[:2])

  def decode(path):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                               expand_animations=False)
    size = tf.shape(image)[:2]
    if resize_to:
      return resize_uint8(image, target), size, True
    ok = tf.reduce_all(tf.equal(size, target))
    # A wrong-sized image is replaced by zeros so batching works; the flag
    # reports it below, so nothing wrong is ever used silently.
    image = tf.cond(ok, lambda: tf.image.resize_with_crop_or_pad(image, *target),
                    lambda: tf.zeros(target + (3,), tf.uint8))
    return image, size, ok

  ds = (tf.data.Dataset.from_tensor_slices(paths)
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(1024))
  images, sizes, oks = [], [], []
  try:
    for image, size, ok in ds:
      images.append(image.numpy())
      sizes.append(size.numpy())
      oks.append(ok.numpy())
  except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError,
          tf.errors.DataLossError):
    # The fast path cannot say which file failed; find it one by one.
    for p in paths:
      try:
        tf.io.decode_image(tf.io.read_file(p), channels=3,
                           expand_animations=False)
      except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError,
              tf.errors.DataLossError):
        raise UserError(f"cannot decode image {p}: not a valid JPEG/PNG; "
                        f"remove or replace it") from None
    raise
  oks_all = np.concatenate(oks)
  if not oks_all.all():
    i = int(np.argmin(oks_all))
    h, w = np.concatenate(sizes)[i]
    raise UserError(
        f"image {paths[i]} is {h}x{w} but {paths[0]} is {target[0]}x"
        f"{target[1]}; images must share one size (or pass --resize_images)")
  return np.concatenate(images)


def load_image_folder(data_dir: str, *, resize_to: tuple[int, int] | None = None
                      ) -> ArrayData:
  """Reads ``train/<class>/*`` and ``test/<class>/*`` images (JPEG or PNG).

  Sorted class folder names give the label ids.

  Args:
    data_dir: The folder holding ``train/`` and ``test/``.
    resize_to: ``(height, width)`` to resize every image to; None requires all
      images to share one size.

  Returns:
    The dataset.

  Raises:
    UserError: for a missing folder, empty or mismatched class folders,
      undecodable images, or images of mixed sizes without ``resize_to``.
  """
  if os.path.isfile(data_dir):
    if zipfile.is_zipfile(data_dir):
      raise UserError(f"--data_dir={data_dir} is a zip file; unpack it first "
                      f"(python -m zipfile -e {data_dir} <folder>)")
    raise UserError(f"--data_dir={data_dir} is a file, not a folder")
  if not os.path.isdir(data_dir):
    raise UserError(f"--data_dir={data_dir} does not exist")
  classes, train_files = _list_split(data_dir, "train")
  test_classes, test_files = _list_split(data_dir, "test")
  if test_classes != classes:
    raise UserError(f"{data_dir}: train/ and test/ have different class "
                    f"folders ({classes} vs {test_classes})")
  arrays = {}
  for split, files in (("train", train_files), ("test", test_files)):
    paths = [p for c in classes for p in files[c]]
    labels = np.concatenate([np.full(len(files[c]), i, np.int32)
                             for i, c in enumerate(classes)])
    arrays[split] = (_decode_images(paths, resize_to), labels)
  if arrays["train"][0].shape[1:] != arrays["test"][0].shape[1:]:
    raise UserError(f"{data_dir}: train images are "
                    f"{arrays['train'][0].shape[1:3]} but test images are "
                    f"{arrays['test'][0].shape[1:3]} (pass --resize_images)")
  return ArrayData(*arrays["train"], *arrays["test"], tuple(classes))


def make_synthetic(*, num_train: int, num_test: int, seed: int,
                   image_shape=(32, 32, 3), num_classes: int = 10) -> ArrayData:
  """Makes a seeded, learnable random dataset.

  Each class has its own random prototype image; examples are the prototype
  plus noise, so a model can learn the task quickly.

  Args:
    num_train: Number of training examples (>= 1).
    num_test: Number of test examples (>= 1).
    seed: Random seed.
    image_shape: Shape of one image.
    num_classes: Number of classes.

  Returns:
    The dataset.
  """
  rng = np.random.default_rng(seed)
  prototypes = rng.uniform(0, 255, (num_classes,) + tuple(image_shape))

  def split(n):
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    noise = rng.normal(0, 64, (n,) + tuple(image_shape))
    images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels

  return ArrayData(*split(num_train), *split(num_test),
                   tuple(f"class_{i}" for i in range(num_classes)))


def _load_folder(config: DataConfig, *, seed: int) -> ArrayData:
  del seed
  if not config.data_dir:
    raise UserError("--dataset=folder needs --data_dir=<folder with train/ "
                    "and test/ class subfolders>")
  return load_image_folder(config.data_dir, resize_to=config.resize_images)


register_dataset("cifar10",
                 lambda config, seed: load_cifar10(config.data_dir))
register_dataset("folder", _load_folder)
register_dataset("synthetic", lambda config, seed: make_synthetic(
    num_train=config.synthetic_train_size,
    num_test=config.synthetic_test_size, seed=seed))


# --------------------------------------------------------------------------
# The pipeline.


def steps_per_epoch(num_examples: int, global_batch_size: int,
                    drop_remainder: bool) -> int:
  """Number of training steps in one epoch.

  Raises:
    UserError: if no full batch fits and the remainder is dropped.
  """
  steps = (num_examples // global_batch_size if drop_remainder
           else -(-num_examples // global_batch_size))
  if steps < 1:
    raise UserError(
        f"global batch size {global_batch_size} exceeds the {num_examples} "
        f"training examples; lower --batch_size or pass --keep_short_batch")
  return steps


def _replica_layout(global_batch_size: int,
                    input_context: tf.distribute.InputContext | None):
  """(local replicas, per-replica batch, first global replica id)."""
  if input_context is None:
    return 1, global_batch_size, 0
  local = (input_context.num_replicas_in_sync //
           input_context.num_input_pipelines)
  per_replica = input_context.get_per_replica_batch_size(global_batch_size)
  return local, per_replica, input_context.input_pipeline_id * local


def _split_for_replicas(ds, global_batch_size, input_context):
  """Turns each global-batch element into this worker's per-replica slices.

  Slices are consecutive along the batch (replica ``k`` gets rows
  ``[k*b, (k+1)*b)``), so a short last batch leaves trailing replicas with
  fewer or no rows.
  """
  local, per_replica, first = _replica_layout(global_batch_size, input_context)
  if input_context is None:
    return ds

  def slices(*element):
    def take(r):
      start = (first + tf.cast(r, tf.int32)) * per_replica
      return tf.nest.map_structure(
          lambda t: t[start:start + per_replica], element)
    return tf.data.Dataset.range(local).map(take)

  return ds.flat_map(slices)


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # Sharding is explicit (each worker slices its replicas' rows), so tf.data
  # must not shard again.
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.OFF)
  return options


def to_float(images_u8):
  """uint8 pixels to the float32 [0, 1] the model takes (also in exports)."""
  return tf.cast(images_u8, tf.float32) * (1.0 / 255.0)


def _augment(images, offsets, flips):
  """Random crop after zero padding, and horizontal flip, per example."""
  p = _CROP_PADDING
  h, w = images.shape[1], images.shape[2]
  padded = tf.pad(images, [[0, 0], [p, p], [p, p], [0, 0]])
  rows = offsets[:, :1] + tf.range(h)[None, :]
  cols = offsets[:, 1:] + tf.range(w)[None, :]
  cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
  cropped = tf.gather(cropped, cols, axis=2, batch_dims=1)
  return tf.where(flips[:, None, None, None], cropped[:, :, ::-1], cropped)


def make_train_dataset(data: ArrayData, *, global_batch_size: int, seed: int,
                       num_epochs: int, start_step: int = 0,
                       drop_remainder: bool = True, augment: bool = False,
                       input_context: tf.distribute.InputContext | None = None
                       ) -> tf.data.Dataset:
  """The training pipeline, from ``start_step`` to the end of training.

  Args:
    data: The dataset.
    global_batch_size: Examples per step over all replicas.
    seed: Seed of the per-epoch order and of augmentation.
    num_epochs: Epochs in the whole run; the dataset ends after the last.
    start_step: Global step to start at (a resumed run's step).
    drop_remainder: Drop each epoch's last short batch.
    augment: Random crop (4-pixel zero padding) and horizontal flip.
    input_context: From ``distribute_datasets_from_function``; None yields
      whole global batches (what ``model.fit`` takes).

  Returns:
    A dataset of ``(images float32 [b, H, W, C] in [0, 1], labels int32 [b])``
    with ``b`` the per-replica batch size (global when no input context).
  """
  n = len(data.train_labels)
  spe = steps_per_epoch(n, global_batch_size, drop_remainder)
  start_epoch, skip = divmod(start_step, spe)
  images = tf.constant(data.train_images)
  labels = tf.constant(data.train_labels)
  seed = tf.constant(seed, tf.int64)

  def epoch_batches(epoch):
    order = tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int32), seed=tf.stack([seed, epoch]))
    return tf.data.Dataset.from_tensor_slices(order).batch(
        global_batch_size, drop_remainder=drop_remainder)

  def draw_augmentation(step, index):
    size = tf.shape(index)[0]
    step_seed = tf.stack([seed, step])
    offsets = tf.random.stateless_uniform(
        [size, 2], step_seed, minval=0, maxval=2 * _CROP_PADDING + 1,
        dtype=tf.int32)
    flips = tf.random.stateless_uniform(
        [size], step_seed + [0, 1 << 40]) < 0.5
    return index, offsets, flips

  ds = (tf.data.Dataset.range(start_epoch, num_epochs)
        .flat_map(epoch_batches)
        .skip(skip))
  if augment:
    ds = ds.enumerate(start=start_step).map(draw_augmentation)
  ds = _split_for_replicas(ds, global_batch_size, input_context)

  def load(index, offsets=None, flips=None):
    x = to_float(tf.gather(images, index))
    if augment:
      x = _augment(x, offsets, flips)
    return x, tf.gather(labels, index)

  return (ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
          .prefetch(tf.data.AUTOTUNE).with_options(_options()))


def eval_steps(num_examples: int, global_batch_size: int) -> int:
  """Steps that cover every test example once (the last batch may be short)."""
  return -(-num_examples // global_batch_size)


def make_eval_dataset(data: ArrayData, *, global_batch_size: int,
                      input_context: tf.distribute.InputContext | None = None
                      ) -> tf.data.Dataset:
  """The test split, every example exactly once, in order.

  Args:
    data: The dataset.
    global_batch_size: Examples per step over all replicas.
    input_context: As in ``make_train_dataset``.

  Returns:
    A dataset of ``(images, labels)`` per-replica batches; there are
    ``eval_steps(...)`` steps, the last possibly short (some replicas empty).
  """
  images = tf.constant(data.test_images)
  labels = tf.constant(data.test_labels)
  ds = tf.data.Dataset.range(len(data.test_labels)).map(
      lambda i: tf.cast(i, tf.int32)).batch(global_batch_size)
  ds = _split_for_replicas(ds, global_batch_size, input_context)
  return (ds.map(lambda i: (to_float(tf.gather(images, i)),
                            tf.gather(labels, i)),
                 num_parallel_calls=tf.data.AUTOTUNE)
          .prefetch(tf.data.AUTOTUNE).with_options(_options()))
