"""Data sources and the ``tf.data`` input pipeline.

Sources (the ``DATASETS`` registry, read by ``load``) return an
``ArrayData``: uint8 images and int32 labels held in memory. CIFAR-10 is 150 MB
as uint8, so decoding once and keeping the arrays is the cache; every epoch
after that only gathers and converts. Adding a source is one function and one
``register_dataset`` line.

The readers of user files never crash on a bad one: a missing, unreadable,
empty, truncated or damaged file anywhere in a dataset ends in one
``UserError`` line naming it, and an image whose header claims more than
``max_image_pixels`` is refused before it is decoded (BUILD.md, "Hostile
inputs").

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
import functools
import io
import os
import pickle
import re
import stat
import struct
import zipfile
from typing import Callable, Mapping

import numpy as np
import tensorflow as tf

from research.config import DataConfig
from research.config import is_eval_set_name
from research.options import DEFAULT_MAX_IMAGE_PIXELS
from research.options import EVAL_SETS
from research.options import RESERVED_RUN_NAMES
from research.errors import UserError
from research.registry import Registry

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                   "frog", "horse", "ship", "truck")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CROP_PADDING = 4
# The pipelines' map functions branch on settings, never on tensors:
# autograph need not convert them (nor what they call), which would re-parse
# their source in every process (about 0.4 s of a smoke run's CPU).
_UNCONVERTED = tf.autograph.experimental.do_not_convert


@dataclasses.dataclass(frozen=True)
class ArrayData:
  """A whole dataset in memory.

  Attributes:
    train_images: uint8 array ``[N, H, W, C]``.
    train_labels: int32 array ``[N]`` with values in ``[0, num_classes)``.
    test_images: uint8 array ``[M, H, W, C]``.
    test_labels: int32 array ``[M]``.
    class_names: One name per label id.
    validation_images: uint8 array ``[V, H, W, C]`` held out of the
      training examples (``split_validation``), or None.
    validation_labels: int32 array ``[V]``, or None.
    extra_eval_sets: More evaluation sets the source adds (e.g. a shifted
      or corrupted test set), name -> ``(images, labels)`` as the test set;
      each is evaluated and logged like ``test`` when a run names it.

  Raises:
    ValueError: for an extra set whose name is taken or not a valid set
      name (``config.is_eval_set_name``).
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...]
  validation_images: np.ndarray | None = None
  validation_labels: np.ndarray | None = None
  extra_eval_sets: Mapping[str, tuple[np.ndarray, np.ndarray]] = (
      dataclasses.field(default_factory=dict))

  def __post_init__(self):
    for name in self.extra_eval_sets:
      if name in EVAL_SETS or not is_eval_set_name(name):
        raise ValueError(f"a dataset's extra evaluation set cannot be named "
                         f"{name!r}: use lowercase letters, digits and _, "
                         f"not {', '.join(EVAL_SETS)} or "
                         f"{', '.join(RESERVED_RUN_NAMES)}")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def eval_set_names(self) -> tuple[str, ...]:
    """The sets that can be evaluated: ``validation`` (if split off),
    ``test`` and the source's extra sets."""
    return ((("validation",) if self.validation_labels is not None
             else ()) + ("test",) + tuple(self.extra_eval_sets))

  def eval_set(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of the evaluation set ``name``.

    Raises:
      UserError: for a set this data does not have.
    """
    if name not in self.eval_set_names:
      fix = (" (pass --validation_size=N to hold one out of the training "
             "examples)" if name == "validation" else "")
      raise UserError(f"no evaluation set {name!r}; this data has "
                      f"{', '.join(self.eval_set_names)}{fix}")
    if name == "validation":
      return self.validation_images, self.validation_labels
    if name == "test":
      return self.test_images, self.test_labels
    return self.extra_eval_sets[name]

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


# --------------------------------------------------------------------------
# Reading user files.
#
# Every reader below turns anything wrong with a file (missing, a folder, a
# pipe, unreadable, empty, truncated, random bytes, crafted) into one
# ``UserError`` line that names the file, wherever the file sits. Files are
# opened and read by Python, so the error always belongs to one known path;
# TensorFlow decodes only bytes already in memory.


def display_path(path) -> str:
  """``path`` as printable text on one line, for messages.

  Bytes that are not UTF-8 (a name written by another system) show as
  ``\\xNN`` and control characters as escapes, so printing never raises and
  a message stays one line.

  Args:
    path: A ``str`` (possibly holding surrogate escapes, as ``os.listdir``
      and ``sys.argv`` return undecodable names), ``bytes`` or path-like.

  Returns:
    The printable text.
  """
  text = os.fsencode(path).decode("utf-8", "backslashreplace")
  return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def describe_error(error: BaseException) -> str:
  """The first line of an exception's message, without TensorFlow's
  ``{{function_node ...}}`` prefix, for a one-line message."""
  text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", str(error)).strip()
  line = text.splitlines()[0].strip() if text else type(error).__name__
  line = re.sub(r"\s*\[Op:\w+\].*$", "", line)  # Which op: not the user's.
  return display_path(line[:300])


def require_utf8_path(path, what: str) -> None:
  """Refuses a path TensorFlow's file system cannot open.

  TensorFlow's readers (checkpoints, SavedModels) take paths as UTF-8
  strings and fail on a name that is not UTF-8.

  Raises:
    UserError: naming the path, if it is not valid UTF-8.
  """
  try:
    os.fsencode(path).decode("utf-8")
  except UnicodeDecodeError:
    raise UserError(f"{what} {display_path(path)} has a name that is not "
                    f"valid UTF-8 (shown as \\xNN), which TensorFlow cannot "
                    f"open; rename it") from None


def _open_regular_file(path, what: str, fix: str) -> int:
  """Opens ``path`` for reading; it must be a regular file.

  Returns:
    The open file descriptor (the caller closes it).

  Raises:
    UserError: naming the file, if it is missing, not a regular file or
      cannot be opened.
  """
  shown = display_path(path)
  try:
    # O_NONBLOCK: opening a FIFO named like a data file must not wait for a
    # writer forever; it is refused below as not a regular file.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK |
                 getattr(os, "O_CLOEXEC", 0))
  except FileNotFoundError:
    raise UserError(f"{what} {shown} does not exist; {fix}") from None
  except PermissionError:
    raise UserError(f"cannot read {what} {shown}: permission denied; make "
                    f"it readable, or {fix}") from None
  except OSError as e:
    raise UserError(f"cannot open {what} {shown} ({e.strerror or e}); "
                    f"{fix}") from None
  try:
    mode = os.fstat(fd).st_mode
  except OSError as e:
    os.close(fd)
    raise UserError(f"cannot read {what} {shown} ({e.strerror or e}); "
                    f"{fix}") from None
  if not stat.S_ISREG(mode):
    os.close(fd)
    kind = "a folder" if stat.S_ISDIR(mode) else "a pipe, socket or device"
    raise UserError(f"{what} {shown} is {kind}, not a file; {fix}")
  return fd


def check_readable_file(path, *, what: str, fix: str,
                        allow_empty: bool = False) -> None:
  """Checks that ``path`` is a regular file this process can open.

  For files another library reads (TensorFlow's checkpoint and SavedModel
  readers), so that their failures name the file first.

  Args:
    path: The file.
    what: What the file is, for messages.
    fix: How to fix a bad file, the end of every message.
    allow_empty: Accept an empty file.

  Raises:
    UserError: naming the file, if it is missing, not a regular file, cannot
      be opened, or is empty (unless ``allow_empty``).
  """
  fd = _open_regular_file(path, what, fix)
  try:
    empty = os.fstat(fd).st_size == 0
  finally:
    os.close(fd)
  if empty and not allow_empty:
    raise UserError(f"{what} {display_path(path)} is empty; {fix}")


def read_file_bytes(path, *, what: str, fix: str,
                    max_bytes: int | None = None) -> bytes:
  """Reads a whole regular file.

  Args:
    path: The file (``str``, ``bytes`` or path-like).
    what: What the file is, for messages (``"image"``, ``"CIFAR-10 batch
      file"``).
    fix: How to fix a bad file, the end of every message.
    max_bytes: Refuse a larger file without reading it (bounds memory).

  Returns:
    The file's bytes (never empty).

  Raises:
    UserError: naming the file, if it is missing, a folder, a pipe, unreadable,
      empty or larger than ``max_bytes``.
  """
  shown = display_path(path)
  fd = _open_regular_file(path, what, fix)
  try:
    size = os.fstat(fd).st_size
    if max_bytes is not None and size > max_bytes:
      raise UserError(f"{what} {shown} is {size} bytes, more than the "
                      f"{max_bytes} bytes such a file can need; {fix}")
    chunks, total = [], 0
    while True:
      # Read to the end rather than trusting st_size (a growing file),
      # but never past the bound.
      chunk = os.read(fd, 1 << 20 if max_bytes is None
                      else min(1 << 20, max_bytes + 1 - total))
      if not chunk:
        break
      chunks.append(chunk)
      total += len(chunk)
      if max_bytes is not None and total > max_bytes:
        raise UserError(f"{what} {shown} is more than the {max_bytes} bytes "
                        f"such a file can need; {fix}")
    if not total:
      raise UserError(f"{what} {shown} is empty; {fix}")
    return b"".join(chunks)
  except OSError as e:
    raise UserError(f"cannot read {what} {shown} ({e.strerror or e}); "
                    f"{fix}") from None
  finally:
    os.close(fd)


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


# The official batch files are 31 MB each; refusing anything far larger
# bounds what one file can make the reader hold.
_MAX_BATCH_FILE_BYTES = 1 << 30
_CIFAR_FIX = "re-download or re-extract cifar-10-python.tar.gz"


def _read_batch_file(path: str) -> dict:
  """Reads one CIFAR-10 pickle with the restricted unpickler; str keys.

  Raises:
    UserError: naming the file, if it is missing, unreadable, damaged,
      unsafe or not a dict.
  """
  shown = display_path(path)
  contents = read_file_bytes(path, what="CIFAR-10 batch file", fix=_CIFAR_FIX,
                             max_bytes=_MAX_BATCH_FILE_BYTES)
  try:
    # From memory: the unpickler can then never read (or allocate) more
    # than the file holds, whatever lengths a damaged file claims.
    obj = _BatchFileUnpickler(io.BytesIO(contents), encoding="bytes").load()
  except Exception as e:  # pylint: disable=broad-except
    # Unpickling arbitrary bytes fails in many ways (EOFError,
    # UnpicklingError, ValueError, KeyError, RecursionError, ...); each
    # means the same: this file is damaged or crafted.
    raise UserError(f"CIFAR-10 batch file {shown} is unreadable or unsafe "
                    f"({describe_error(e)}); {_CIFAR_FIX}") from None
  if not isinstance(obj, dict):
    raise UserError(f"CIFAR-10 batch file {shown} does not hold a dict; "
                    f"{_CIFAR_FIX}")
  return {k.decode("utf-8", "replace") if isinstance(k, bytes) else k: v
          for k, v in obj.items()}


def _batch_arrays(path: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """The images (HWC uint8) and labels of one CIFAR-10 batch file.

  Raises:
    UserError: naming the file, if it is unreadable or malformed, or a label
      is outside ``[0, num_classes)``.
  """
  shown = display_path(path)
  batch = _read_batch_file(path)
  for key in ("data", "labels"):
    if key not in batch:
      raise UserError(f"CIFAR-10 batch file {shown} has no '{key}' entry; "
                      f"{_CIFAR_FIX}")
  try:
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
  except (ValueError, TypeError, OverflowError) as e:
    raise UserError(f"CIFAR-10 batch file {shown} is malformed "
                    f"({describe_error(e)}); {_CIFAR_FIX}") from None
  if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or
      labels.ndim != 1 or labels.dtype.kind not in "iu" or
      len(labels) != len(data)):
    raise UserError(
        f"CIFAR-10 batch file {shown} is malformed: data {data.dtype} "
        f"{list(data.shape)}, labels {labels.dtype} {list(labels.shape)} (want "
        f"uint8 [n, 3072] and n integer labels); {_CIFAR_FIX}")
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    i = int(np.argmax(bad))
    raise UserError(f"CIFAR-10 batch file {shown}: label {labels[i]} of "
                    f"example {i} is outside [0, {num_classes})")
  # Rows are channel-major (1024 R, 1024 G, 1024 B); make them HWC.
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int32)


def _find_cifar10_python_dir(data_dir: str) -> str:
  candidates = [data_dir, os.path.join(data_dir, "cifar-10-batches-py")]
  for d in candidates:
    # lexists, not isfile: a data_batch_1 that is a folder or a dangling
    # link is the place to look, and its reader says what is wrong with it.
    if os.path.lexists(os.path.join(d, "data_batch_1")):
      return d
  raise UserError(
      f"no CIFAR-10 python batches in {display_path(data_dir)} (looked for "
      f"data_batch_1 in {' and '.join(display_path(c) for c in candidates)}); "
      f"pass --data_dir=<folder holding cifar-10-batches-py>")


def _class_names_of(meta: str) -> tuple[str, ...]:
  """The label names ``batches.meta`` lists (str, in label order)."""
  shown = display_path(meta)
  names = _read_batch_file(meta).get("label_names", ())
  if (not isinstance(names, (list, tuple)) or
      not all(isinstance(n, (bytes, str)) for n in names)):
    raise UserError(f"{shown} has no list of label_names; {_CIFAR_FIX}")
  try:
    names = tuple(n.decode("utf-8") if isinstance(n, bytes) else n
                  for n in names)
  except UnicodeDecodeError:
    raise UserError(f"{shown} holds a label name that is not UTF-8; "
                    f"{_CIFAR_FIX}") from None
  if len(names) < 2:
    raise UserError(f"{shown} lists {len(names)} class names; need at "
                    f"least 2")
  return names


def load_cifar10_python(data_dir: str) -> ArrayData:
  """Reads the official "CIFAR-10 python version" files.

  Args:
    data_dir: ``cifar-10-batches-py/`` itself or its parent.

  Returns:
    The dataset.

  Raises:
    UserError: naming the file, if a file is missing, unreadable, damaged,
      malformed or unsafe, or labels are out of range.
  """
  if os.path.isfile(data_dir):
    raise UserError(f"--data_dir={display_path(data_dir)} is a file; pass "
                    f"the folder that holds cifar-10-batches-py")
  root = _find_cifar10_python_dir(data_dir)
  meta = os.path.join(root, "batches.meta")
  names = _class_names_of(meta) if os.path.lexists(meta) else CIFAR10_CLASSES
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


def _list_dir(path: str) -> list[str]:
  try:
    return os.listdir(path)
  except OSError as e:
    raise UserError(f"cannot list {display_path(path)} ({e.strerror or e}); "
                    f"check that it is a readable folder") from None


def list_image_folder_split(root: str, split: str
                            ) -> tuple[list[str], dict[str, list[str]]]:
  """The sorted class folders of ``root/split`` and their image files.

  Args:
    root: The folder holding ``train/<class>/`` and ``test/<class>/``.
    split: ``"train"`` or ``"test"``.

  Returns:
    ``(classes, files)``: the class folder names, sorted (label i is
    ``classes[i]``), and each class's image paths, sorted.

  Raises:
    UserError: for a missing or unreadable split, no class folders, a class
      folder without images or whose name is not UTF-8.
  """
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise UserError(f"image folder {display_path(root)} has no {split}/ "
                    f"subfolder; expected {split}/<class>/<image>.jpg")
  classes = sorted(d for d in _list_dir(split_dir)
                   if os.path.isdir(os.path.join(split_dir, d)))
  if not classes:
    raise UserError(f"{display_path(split_dir)} has no class subfolders")
  files = {}
  for c in classes:
    cdir = os.path.join(split_dir, c)
    try:
      c.encode("utf-8")
    except UnicodeEncodeError:
      # Class names are written into the export as text.
      raise UserError(f"class folder {display_path(cdir)}: its name is not "
                      f"valid UTF-8; rename it") from None
    files[c] = sorted(os.path.join(cdir, f) for f in _list_dir(cdir)
                      if f.lower().endswith(_IMAGE_SUFFIXES))
    if not files[c]:
      raise UserError(f"class folder {display_path(cdir)} holds no "
                      f".jpg/.jpeg/.png images")
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


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# image_header's reason for bytes that start like no image format it knows.
NOT_AN_IMAGE = "not a JPEG, PNG, GIF or BMP file"
# JPEG start-of-frame markers (they hold the size): C0-CF except DHT (C4),
# JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and RST0-RST7 (SOI/EOI handled apart).
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def _jpeg_size(contents: bytes) -> tuple[int, int]:
  """(height, width) from a JPEG's frame header, walking the marker segments
  as libjpeg does; nothing is decoded."""
  i, n = 2, len(contents)
  while i < n:
    if contents[i] != 0xFF:
      # libjpeg skips stray bytes before a marker (with a warning).
      i = contents.find(b"\xff", i)
      if i < 0:
        break
      continue
    while i < n and contents[i] == 0xFF:  # Fill bytes.
      i += 1
    if i >= n:
      break
    marker = contents[i]
    i += 1
    if marker == 0x00 or marker in _JPEG_STANDALONE:
      continue  # 0xFF00 is a stuffed byte, not a marker.
    if marker in (0xD9, 0xDA):
      break  # End of image, or scan data, before any frame header.
    if i + 2 > n:
      break
    length = int.from_bytes(contents[i:i + 2], "big")
    if marker in _JPEG_SOF:
      if length < 8 or i + 7 > n:
        break
      return (int.from_bytes(contents[i + 3:i + 5], "big"),
              int.from_bytes(contents[i + 5:i + 7], "big"))
    if length < 2:
      break
    i += length
  raise ValueError("no JPEG frame header (truncated or damaged)")


def image_header(contents: bytes) -> tuple[str, int, int]:
  """The format and size an encoded image's header claims, without decoding.

  Args:
    contents: The file's bytes (at least its header).

  Returns:
    ``(format, height, width)``, format one of ``jpeg``, ``png``, ``gif``,
    ``bmp``.

  Raises:
    ValueError: if the bytes are none of those formats or the header is
      damaged; the message says which.
  """
  if contents.startswith(_PNG_SIGNATURE):
    # The IHDR chunk comes first: length, "IHDR", width, height (big-endian).
    if len(contents) < 24 or contents[12:16] != b"IHDR":
      raise ValueError("PNG without an IHDR header (truncated or damaged)")
    width, height = struct.unpack(">II", contents[16:24])
    return "png", height, width
  if contents.startswith(b"\xff\xd8\xff"):
    return ("jpeg", *_jpeg_size(contents))
  if contents[:6] in (b"GIF87a", b"GIF89a"):
    if len(contents) < 10:
      raise ValueError("GIF without a screen descriptor (truncated)")
    width, height = struct.unpack("<HH", contents[6:10])
    return "gif", height, width
  if contents.startswith(b"BM"):
    if len(contents) < 26:
      raise ValueError("BMP without an info header (truncated)")
    width, height = struct.unpack("<ii", contents[18:26])
    return "bmp", abs(height), abs(width)  # Negative height: top-down rows.
  raise ValueError(NOT_AN_IMAGE)


def check_image_size(shown: str, height: int, width: int,
                     max_image_pixels: int) -> None:
  """Refuses a header size that is empty or over the pixel limit.

  Args:
    shown: The image's path, as ``display_path`` prints it.
    height: Height the header claims.
    width: Width the header claims.
    max_image_pixels: The most pixels (height x width) allowed.

  Raises:
    UserError: naming the image and the size it claims.
  """
  if height < 1 or width < 1:
    raise UserError(f"image {shown} claims {height}x{width} pixels; it is "
                    f"damaged: remove or replace it")
  if height * width > max_image_pixels:
    raise UserError(
        f"image {shown} claims {height}x{width} pixels (height x width), more "
        f"than the limit of {max_image_pixels} pixels; decoding it would take "
        f"{height * width * 3 / 2**30:.1f} GiB (a decompression bomb?): "
        f"remove it, or raise the limit (max_image_pixels, "
        f"--max_image_pixels) if it is genuine")


def max_image_file_bytes(max_image_pixels: int) -> int:
  """The largest encoded file an image within the pixel limit can need: 8
  bytes a pixel (uncompressed 16-bit RGBA) plus 16 MiB of metadata."""
  return 8 * max_image_pixels + (16 << 20)


_FOLDER_FORMATS = ("jpeg", "png")
_IMAGE_FIX = "remove or replace it"
# Encoded bytes held at once while decoding a split (bounds memory, not
# the result: the decoded arrays are the dataset).
_DECODE_CHUNK_BYTES = 64 << 20
_DECODE_CHUNK_FILES = 16384


def _read_image(path: str, max_image_pixels: int
                ) -> tuple[bytes, tuple[int, int]]:
  """Reads one image file and checks its header: (bytes, (height, width)).

  Raises:
    UserError: naming the file, if it cannot be read, is not a JPEG or PNG,
      has a damaged header or claims more than ``max_image_pixels``.
  """
  shown = display_path(path)
  contents = read_file_bytes(path, what="image", fix=_IMAGE_FIX,
                             max_bytes=max_image_file_bytes(max_image_pixels))
  try:
    kind, height, width = image_header(contents)
  except ValueError as e:
    detail = "" if str(e) == NOT_AN_IMAGE else f" ({e})"
    raise UserError(f"cannot decode image {shown}: not a valid JPEG/PNG"
                    f"{detail}; {_IMAGE_FIX}") from None
  if kind not in _FOLDER_FORMATS:
    raise UserError(f"image {shown} is a {kind.upper()} file; image folders "
                    f"take JPEG or PNG: convert it to PNG")
  check_image_size(shown, height, width, max_image_pixels)
  return contents, (height, width)


@functools.lru_cache(maxsize=None)
def _image_decoder(target: tuple[int, int], resize: bool) -> Callable:
  """One encoded image -> (uint8 ``[*target, 3]``, its decoded size, whether
  that size is ``target`` or it was resized to it).

  One per size and mode: a ``tf.function`` traced once per process, not once
  per chunk or folder read.
  """

  @tf.function(input_signature=[tf.TensorSpec([], tf.string)],
               autograph=False)
  def decode(encoded):
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    size = tf.shape(image)[:2]
    if resize:
      return resize_uint8(image, target), size, tf.constant(True)
    ok = tf.reduce_all(tf.equal(size, target))
    # A wrong-sized image is replaced by zeros so batching works; the flag
    # reports it below, so nothing wrong is ever used silently.
    image = tf.cond(ok, lambda: tf.image.resize_with_crop_or_pad(image, *target),
                    lambda: tf.zeros(target + (3,), tf.uint8))
    return image, size, ok

  return decode


def _decode_chunk(paths: list[str], contents: list[bytes],
                  target: tuple[int, int], resize: bool) -> np.ndarray:
  """Decodes encoded images (already read and checked) in parallel."""
  ds = (tf.data.Dataset.from_tensor_slices(tf.constant(contents, tf.string))
        .map(_image_decoder(tuple(target), resize),
             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(len(contents)))
  try:
    images, sizes, oks = (t.numpy() for t in next(iter(ds)))
  except tf.errors.OpError as e:
    # The parallel decode cannot say which file failed; find it one by one.
    for path, encoded in zip(paths, contents):
      try:
        tf.io.decode_image(encoded, channels=3, expand_animations=False)
      except tf.errors.OpError as one:
        raise UserError(f"cannot decode image {display_path(path)}: not a "
                        f"valid JPEG/PNG ({describe_error(one)}); "
                        f"{_IMAGE_FIX}") from None
    raise UserError(f"decoding the images {display_path(paths[0])} ... "
                    f"{display_path(paths[-1])} failed ({describe_error(e)})"
                    ) from None
  if not oks.all():
    # The header said one size and the decoder made another.
    i = int(np.argmin(oks))
    raise UserError(
        f"image {display_path(paths[i])} is {sizes[i][0]}x{sizes[i][1]} but "
        f"its header says {target[0]}x{target[1]}; it is damaged: "
        f"{_IMAGE_FIX}")
  return images


def _decode_images(paths: list[str], resize_to: tuple[int, int] | None,
                   max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
                   ) -> np.ndarray:
  """Reads and decodes image files into one uint8 array ``[n, H, W, 3]``.

  Each file is read and its header checked (format, size within
  ``max_image_pixels``, the same size as the first image unless
  ``resize_to``) before any of it is decoded; then the checked bytes are
  decoded in parallel, a chunk at a time. Every file, the first one
  included, goes through this one path, so an error always names its file.

  Raises:
    UserError: naming the file, for one that cannot be read or decoded,
      claims too many pixels, or (without ``resize_to``) differs in size from
      the first image.
  """
  target = tuple(resize_to) if resize_to else None
  first = None
  out = []
  chunk_paths, chunk_contents, chunk_bytes = [], [], 0
  for i, path in enumerate(paths):
    contents, size = _read_image(path, max_image_pixels)
    if first is None:
      first = path
      target = target or size
    elif not resize_to and size != target:
      raise UserError(
          f"image {display_path(path)} is {size[0]}x{size[1]} but "
          f"{display_path(first)} is {target[0]}x{target[1]}; images must "
          f"share one size (or pass --resize_images)")
    chunk_paths.append(path)
    chunk_contents.append(contents)
    chunk_bytes += len(contents)
    if (chunk_bytes >= _DECODE_CHUNK_BYTES or i == len(paths) - 1 or
        len(chunk_paths) == _DECODE_CHUNK_FILES):
      out.append(_decode_chunk(chunk_paths, chunk_contents, target,
                               bool(resize_to)))
      chunk_paths, chunk_contents, chunk_bytes = [], [], 0
  return np.concatenate(out)


def load_image_folder(data_dir: str, *,
                      resize_to: tuple[int, int] | None = None,
                      max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
                      ) -> ArrayData:
  """Reads ``train/<class>/*`` and ``test/<class>/*`` images (JPEG or PNG).

  Sorted class folder names give the label ids.

  Args:
    data_dir: The folder holding ``train/`` and ``test/``.
    resize_to: ``(height, width)`` to resize every image to; None requires all
      images to share one size.
    max_image_pixels: The most pixels (height x width) an image's header may
      claim; a larger one is refused before it is decoded.

  Returns:
    The dataset.

  Raises:
    UserError: naming the file or folder, for a missing folder, empty or
      mismatched class folders, a file that cannot be read, is not a JPEG or
      PNG or is damaged, an image over the pixel limit, or images of mixed
      sizes without ``resize_to``.
  """
  shown = display_path(data_dir)
  if os.path.isfile(data_dir):
    if zipfile.is_zipfile(data_dir):
      raise UserError(f"--data_dir={shown} is a zip file; unpack it first "
                      f"(python -m zipfile -e {shown} <folder>)")
    raise UserError(f"--data_dir={shown} is a file, not a folder")
  if not os.path.isdir(data_dir):
    raise UserError(f"--data_dir={shown} does not exist")
  classes, train_files = list_image_folder_split(data_dir, "train")
  test_classes, test_files = list_image_folder_split(data_dir, "test")
  if test_classes != classes:
    raise UserError(f"{shown}: train/ and test/ have different class "
                    f"folders ({classes} vs {test_classes})")
  arrays = {}
  for split, files in (("train", train_files), ("test", test_files)):
    paths = [p for c in classes for p in files[c]]
    labels = np.concatenate([np.full(len(files[c]), i, np.int32)
                             for i, c in enumerate(classes)])
    arrays[split] = (_decode_images(paths, resize_to, max_image_pixels),
                     labels)
  if arrays["train"][0].shape[1:] != arrays["test"][0].shape[1:]:
    raise UserError(f"{shown}: train images are "
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
  return load_image_folder(
      config.data_dir, resize_to=config.resize_images,
      max_image_pixels=config.max_image_pixels)


register_dataset("cifar10",
                 lambda config, seed: load_cifar10(config.data_dir))
register_dataset("folder", _load_folder)
register_dataset("synthetic", lambda config, seed: make_synthetic(
    num_train=config.synthetic_train_size,
    num_test=config.synthetic_test_size, seed=seed))


# --------------------------------------------------------------------------
# The pipeline.


# The validation split's own seed: every run of a dataset, whatever its
# --seed, holds out the same examples.
VALIDATION_SPLIT_SEED = 20_161_130


def split_validation(data: ArrayData, size: int) -> ArrayData:
  """Holds ``size`` training examples out as the ``validation`` set.

  Stratified: each class gives its share of ``size`` (its fraction of the
  training examples, rounded by largest remainder so the shares add up to
  ``size``), drawn by ``VALIDATION_SPLIT_SEED`` alone, so every run of the
  same data, any ``--seed``, any worker, resumed or not, holds out the same
  examples. The training examples keep their order, minus those held out.

  Args:
    data: The dataset (without a validation set).
    size: Examples to hold out; 0 returns ``data`` unchanged.

  Returns:
    The data with fewer training examples and a validation set.

  Raises:
    UserError: if ``size`` is negative, not smaller than the training set,
      or would leave a class with no training example.
  """
  if size == 0:
    return data
  labels = data.train_labels
  n = len(labels)
  if not 0 < size < n:
    raise UserError(f"--validation_size={size} must be in [0, {n}): the "
                    f"training set has {n} examples")
  counts = np.bincount(labels, minlength=data.num_classes)
  exact = counts * size / n
  shares = np.floor(exact).astype(np.int64)
  # Largest remainders first; ties to the lower class id.
  order = sorted(range(len(counts)), key=lambda c: (shares[c] - exact[c], c))
  for c in order[:size - int(shares.sum())]:
    shares[c] += 1
  emptied = [data.class_names[c] for c in range(len(counts))
             if counts[c] and shares[c] >= counts[c]]
  if emptied:
    raise UserError(f"--validation_size={size} leaves no training example of "
                    f"class {', '.join(emptied)}; pass a smaller size")
  rng = np.random.default_rng(VALIDATION_SPLIT_SEED)
  held = np.zeros(n, bool)
  for c in range(len(counts)):
    members = np.flatnonzero(labels == c)
    held[rng.permutation(members)[:shares[c]]] = True
  return dataclasses.replace(
      data, train_images=data.train_images[~held],
      train_labels=labels[~held], validation_images=data.train_images[held],
      validation_labels=labels[held])


def steps_per_epoch(num_examples: int, global_batch_size: int,
                    drop_remainder: bool) -> int:
  """Number of training steps in one epoch.

  Args:
    num_examples: Training examples.
    global_batch_size: Examples per step over all replicas.
    drop_remainder: Whether the last short batch is dropped.

  Returns:
    The steps, at least 1.

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

  @_UNCONVERTED
  def slices(*element):
    @_UNCONVERTED
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


def preprocess(pixels, offsets=None, flips=None, boxes=None):
  """The model's input from uint8 pixels: augmented if ``offsets``/``flips``
  (and ``boxes``) are given, then ``to_float``.

  The input pipeline applies it on the host, or the step on its device
  (``make_train_dataset(preprocess=False)``): four times fewer bytes cross
  to a GPU. Crop and flip move pixels without arithmetic, so augmenting the
  uint8 pixels gives exactly what augmenting their floats would.

  Args:
    pixels: uint8 ``[b, H, W, C]``.
    offsets: int32 ``[b, 2]``: each crop's top-left corner in the padded
      image; None for no augmentation.
    flips: bool ``[b]``: flip horizontally.
    boxes: int32 ``[b, 4]``: ``(top, left, bottom, right)`` of each
      image's cutout, zeroed after the crop and flip; None for none.

  Returns:
    float32 ``[b, H, W, C]`` in [0, 1].
  """
  if offsets is not None:
    pixels = _augment(pixels, offsets, flips)
  if boxes is not None:
    pixels = _cut_out(pixels, boxes)
  return to_float(pixels)


def _cut_out(images, boxes):
  """Zeroes rows ``[top, bottom)`` x columns ``[left, right)`` of each
  image (``boxes``: ``[b, 4]``)."""
  rows = tf.range(images.shape[1])[None, :]
  cols = tf.range(images.shape[2])[None, :]
  in_rows = (rows >= boxes[:, 0:1]) & (rows < boxes[:, 2:3])
  in_cols = (cols >= boxes[:, 1:2]) & (cols < boxes[:, 3:4])
  inside = in_rows[:, :, None] & in_cols[:, None, :]
  return tf.where(inside[..., None], tf.zeros_like(images), images)


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
                       cutout: int = 0,
                       input_context: tf.distribute.InputContext | None = None,
                       preprocess_in_pipeline: bool = True
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
    cutout: With ``augment``, also zero a ``cutout`` x ``cutout`` square
      of each image, centered uniformly over it (clipped at the borders);
      0 for none.
    input_context: From ``distribute_datasets_from_function``; None yields
      whole global batches (what ``model.fit`` takes).
    preprocess_in_pipeline: Apply ``preprocess`` here. False leaves it to
      the step, on its device (``distribute.preprocesses_on_device``): the
      elements are then the uint8 pixels, the labels and, with ``augment``,
      the drawn ``offsets`` and ``flips`` (and cutout ``boxes``).

  Returns:
    A dataset of ``(images float32 [b, H, W, C] in [0, 1], labels int32 [b])``
    with ``b`` the per-replica batch size (global when no input context);
    without ``preprocess_in_pipeline``, of ``(pixels uint8, labels[,
    offsets, flips[, boxes]])``. The same seed gives the same augmented
    images either way.

  Raises:
    UserError: if no full batch fits (and short batches are dropped).
    ValueError: for ``cutout`` without ``augment``.
  """
  if cutout and not augment:
    raise ValueError("cutout needs augment")
  n = len(data.train_labels)
  spe = steps_per_epoch(n, global_batch_size, drop_remainder)
  start_epoch, skip = divmod(start_step, spe)
  images = tf.constant(data.train_images)
  labels = tf.constant(data.train_labels)
  seed = tf.constant(seed, tf.int64)

  @_UNCONVERTED
  def epoch_batches(epoch):
    order = tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int32), seed=tf.stack([seed, epoch]))
    return tf.data.Dataset.from_tensor_slices(order).batch(
        global_batch_size, drop_remainder=drop_remainder)

  @_UNCONVERTED
  def draw_augmentation(step, index):
    size = tf.shape(index)[0]
    step_seed = tf.stack([seed, step])
    offsets = tf.random.stateless_uniform(
        [size, 2], step_seed, minval=0, maxval=2 * _CROP_PADDING + 1,
        dtype=tf.int32)
    flips = tf.random.stateless_uniform(
        [size], step_seed + [0, 1 << 40]) < 0.5
    if not cutout:
      return index, offsets, flips
    height, width = data.image_shape[:2]
    # Uniform integers in [0, side): the op takes scalar bounds only.
    centers = tf.cast(tf.floor(tf.random.stateless_uniform(
        [size, 2], step_seed + [0, 2 << 40]) * [height, width]), tf.int32)
    corners = centers - cutout // 2
    boxes = tf.concat([tf.maximum(corners, 0),
                       tf.minimum(corners + cutout, [height, width])], axis=1)
    return index, offsets, flips, boxes

  ds = (tf.data.Dataset.range(start_epoch, num_epochs)
        .flat_map(epoch_batches)
        .skip(skip))
  if augment:
    ds = ds.enumerate(start=start_step).map(draw_augmentation)
  ds = _split_for_replicas(ds, global_batch_size, input_context)

  @_UNCONVERTED
  def load(index, *augmentation):
    pixels = tf.gather(images, index)
    if preprocess_in_pipeline:
      return preprocess(pixels, *augmentation), tf.gather(labels, index)
    return (pixels, tf.gather(labels, index)) + augmentation

  return (ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
          .prefetch(tf.data.AUTOTUNE).with_options(_options()))


def eval_steps(num_examples: int, global_batch_size: int) -> int:
  """Steps that cover every test example once (the last batch may be short)."""
  return -(-num_examples // global_batch_size)


def make_eval_dataset(data: ArrayData, *, global_batch_size: int,
                      input_context: tf.distribute.InputContext | None = None,
                      padded: bool = True,
                      preprocess_in_pipeline: bool = True,
                      eval_set: str = "test") -> tf.data.Dataset:
  """An evaluation set, every example exactly once, in order.

  Every batch is full: the last one is padded to ``global_batch_size`` with
  rows of weight 0, so that every replica gets the same number of rows in
  every step. A short last batch would otherwise leave some replicas with
  none (CIFAR-10's 10,000 images on 8 replicas of 32 end in 16 rows), an
  empty batch some GPU kernels have failed on, and a new shape that XLA
  would compile again.

  Args:
    data: The dataset.
    global_batch_size: Examples per step over all replicas.
    input_context: As in ``make_train_dataset``.
    padded: False gives ``(images, labels)`` batches with a short last one
      and no weights, as ``model.evaluate`` takes them.
    preprocess_in_pipeline: As in ``make_train_dataset``: False yields the
      uint8 pixels.
    eval_set: Which set (``ArrayData.eval_set``).

  Returns:
    A dataset of ``(images, labels, weights)`` per-replica batches (float32
    weights, 1 for a real example, 0 for padding); there are
    ``eval_steps(...)`` steps.
  """
  images, labels = data.eval_set(eval_set)
  count = len(labels)
  images, labels = tf.constant(images), tf.constant(labels)
  size = (eval_steps(count, global_batch_size) * global_batch_size
          if padded else count)
  # Index -1 marks padding (it gathers example 0, weighted 0).
  ds = tf.data.Dataset.range(size).map(_UNCONVERTED(
      lambda i: tf.where(i < count, tf.cast(i, tf.int32), -1))
  ).batch(global_batch_size)
  ds = _split_for_replicas(ds, global_batch_size, input_context)

  @_UNCONVERTED
  def rows(i):
    real = tf.maximum(i, 0)
    pixels = tf.gather(images, real)
    out = (preprocess(pixels) if preprocess_in_pipeline else pixels,
           tf.gather(labels, real))
    return out + (tf.cast(i >= 0, tf.float32),) if padded else out

  return (ds.map(rows, num_parallel_calls=tf.data.AUTOTUNE)
          .prefetch(tf.data.AUTOTUNE).with_options(_options()))
