"""Every reader of user files refuses a bad file with one line naming it.

One parametrized test covers readers x positions x kinds of bad file: the
image folder (first, middle and last image of train and of test, in sorted
order), the CIFAR-10 batch files (batches.meta, the first, a middle and the
last training batch, the test batch), a run's model.json, a checkpoint (its
index, its data, the run's checkpoint state file) read by export.py and by the
trainer's resume (CheckpointKeeper), and an export (saved_model.pb, the
variables' index and data). Each bad file must end in one
``research.errors.UserError`` whose message is one line, names the file and
prints (valid UTF-8 even when the file's name is not), never in another
exception. The readers are called in this process; real processes of
train_loop.py, predict.py and export.py check what the user sees (exit status
2, one ``error:`` line, no traceback).

Decompression bombs: an image whose header claims 30000x30000 pixels is
refused, naming that size, before it is decoded; in a real training process,
a 23000x23000 bomb (first, or in the middle of train) is refused under an
address-space limit that any decode of it would exceed.

As root, "unreadable" is made real by dropping the capabilities that let root
read any file from the test's thread (``_file_permissions_enforced``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pickle
import re
import resource
import shutil
import struct
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, SCRIPTS, run_in_process, run_script
from conftest import write_cifar_batches
from conftest import write_image_folder
from research import data as data_lib
from research import export as export_lib
from research import model as model_lib
from research.checkpoints import CheckpointKeeper
from research.config import DataConfig, ModelConfig
from research.errors import UserError

import predict  # scripts/predict.py (conftest puts scripts/ on the path)

# A name that is not UTF-8, as another system may have written it.
NON_UTF8 = b"\xff\xfe"
NON_UTF8_SHOWN = "\\xff\\xfe"  # How messages print it (display_path).

CLASSES = ("a", "b", "c", "d")

# reader -> {position: the bad file, relative to the case's root}.
POSITIONS = {
    # Sorted order: a/0.jpg a/1.png a/2.jpg b/0.jpg ... d/2.jpg.
    "folder": {"train_first": "train/a/0.jpg", "train_middle": "train/c/0.jpg",
               "train_last": "train/d/2.jpg", "test_first": "test/a/0.jpg",
               "test_middle": "test/b/1.png", "test_last": "test/d/2.jpg"},
    "cifar": {"meta": "batches.meta", "first": "data_batch_1",
              "middle": "data_batch_3", "last": "data_batch_5",
              "test": "test_batch"},
    "model_json": {"spec": "model.json"},
    "checkpoint": {"index": "checkpoints/ckpt-5.index",
                   "data": "checkpoints/ckpt-5.data-00000-of-00001",
                   "state": "checkpoints/checkpoint"},
    # The trainer's own restore (CheckpointKeeper), on a resume.
    "resume": {"index": "checkpoints/ckpt-5.index",
               "data": "checkpoints/ckpt-5.data-00000-of-00001",
               "state": "checkpoints/checkpoint"},
    "export": {"saved_model_pb": "export/saved_model.pb",
               "index": "export/variables/variables.index",
               "data": "export/variables/variables.data-00000-of-00001"},
}

KINDS = ("empty", "random_bytes", "truncated_1_byte", "truncated_half",
         "truncated_all_but_1", "directory", "fifo", "unreadable",
         "non_utf8_name")

# Readers that hand paths to TensorFlow, which cannot open a name that is
# not UTF-8: they refuse the path itself, by name, before reading anything.
TF_PATH_READERS = ("checkpoint", "resume", "export")

# (reader, position, kind) that do not make a bad file, with the reason.
NOT_BAD = {
    ("checkpoint", "state", "truncated_all_but_1"):
        "the state file is text: without its final newline it is whole",
    ("resume", "state", "truncated_all_but_1"):
        "the state file is text: without its final newline it is whole",
}

CASES = [(reader, position, kind)
         for reader, positions in POSITIONS.items()
         for position in positions for kind in KINDS
         if (reader, position, kind) not in NOT_BAD]


# Templates, written once -----------------------------------------------------


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
  """Good inputs of every reader, copied and damaged by each case."""
  root = tmp_path_factory.mktemp("templates")
  folder = str(root / "folder")
  write_image_folder(folder, classes=CLASSES, per_class=3, size=8)
  write_cifar_batches(str(root / "cifar"), per_batch=6, num_test=8)
  run = str(root / "run")
  os.makedirs(run)
  class_names = list(CLASSES)
  # 32x32: the ConvNet needs at least that much to build.
  model = model_lib.create(ModelConfig(), num_classes=len(class_names),
                           image_shape=(32, 32, 3))
  with open(os.path.join(run, "model.json"), "w") as f:
    json.dump(export_lib.model_spec(class_names=class_names,
                                    image_shape=(32, 32, 3),
                                    model_config=ModelConfig()), f)
  tf.train.CheckpointManager(tf.train.Checkpoint(model=model),
                             os.path.join(run, "checkpoints"),
                             max_to_keep=3).save(checkpoint_number=5)
  export_lib.export_saved_model(model, os.path.join(run, "export"),
                                class_names=class_names,
                                image_shape=(32, 32, 3))
  return {"folder": folder,
          "cifar": str(root / "cifar" / "cifar-10-batches-py"),
          "model_json": run, "checkpoint": run, "resume": run, "export": run}


def _read(reader, position, root):
  """Calls the reader under test on the case's root."""
  if reader == "folder":
    return data_lib.load_image_folder(root)
  if reader == "cifar":
    return data_lib.load_cifar10_python(root)
  if reader == "checkpoint" and position != "state":
    # An explicit --checkpoint; the state file case reads the run's latest.
    return export_lib.load_model_from_run(
        root, os.path.join(root, "checkpoints", "ckpt-5"))
  if reader in ("model_json", "checkpoint"):
    return export_lib.load_model_from_run(root)
  if reader == "resume":
    model = model_lib.create(ModelConfig(), num_classes=len(CLASSES),
                             image_shape=(32, 32, 3))
    return CheckpointKeeper(
        checkpoint=tf.train.Checkpoint(model=model),
        directory=os.path.join(root, "checkpoints")).restore_latest()
  return predict.load_export(os.path.join(root, "export"))


@pytest.mark.parametrize("reader", sorted(POSITIONS))
def test_the_templates_are_good(templates, tmp_path, reader):
  """Each case's error comes from its bad file, not from the template."""
  root = str(tmp_path / "case")
  shutil.copytree(templates[reader], root)
  _read(reader, next(iter(POSITIONS[reader])), root)


# Denying reads, for real, even as root ---------------------------------------


_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


class _CapHeader(ctypes.Structure):
  _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
  _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
              ("inheritable", ctypes.c_uint32)]


@contextlib.contextmanager
def _file_permissions_enforced():
  """Makes file permissions apply to this thread, even as root.

  Root reads any file because of two capabilities, CAP_DAC_OVERRIDE and
  CAP_DAC_READ_SEARCH. This drops them from the calling thread's effective
  set (they stay permitted) and raises them again afterwards: Linux keeps
  capabilities per thread, and a process may always lower and re-raise
  effective capabilities within its permitted set. Not root: nothing to do.
  """
  if os.geteuid() != 0:
    yield
    return
  if not sys.platform.startswith("linux"):
    pytest.skip("as root, only Linux capabilities can deny a read here")
  libc = ctypes.CDLL(None, use_errno=True)
  header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
  caps = (_CapData * 2)()
  if libc.capget(ctypes.byref(header), caps) != 0:
    pytest.skip(f"capget failed (errno {ctypes.get_errno()})")
  effective = caps[0].effective
  caps[0].effective &= ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH))
  if libc.capset(ctypes.byref(header), caps) != 0:
    pytest.skip(f"capset failed (errno {ctypes.get_errno()}); cannot deny "
                f"reads as root here")
  try:
    yield
  finally:
    caps[0].effective = effective
    assert libc.capset(ctypes.byref(header), caps) == 0


def test_unreadable_files_really_are_unreadable(tmp_path):
  """The "unreadable" kind is real: open() fails with EACCES (as root too)."""
  path = tmp_path / "secret"
  path.write_bytes(b"x")
  path.chmod(0)
  with _file_permissions_enforced():
    with pytest.raises(PermissionError):
      open(path, "rb").close()
    with pytest.raises(tf.errors.PermissionDeniedError):
      tf.io.read_file(str(path))
  if os.geteuid() == 0:
    open(path, "rb").close()  # Root's capabilities are back.


# Making a bad file -----------------------------------------------------------


def _damage(path: bytes, kind: str) -> None:
  """Replaces the file at ``path`` with a bad one of ``kind``."""
  with open(path, "rb") as f:
    original = f.read()
  os.remove(path)
  rng = np.random.default_rng(len(original))
  contents = {
      "empty": b"",
      "random_bytes": rng.bytes(max(len(original), 64)),
      "truncated_1_byte": original[:1],
      "truncated_half": original[:len(original) // 2],
      "truncated_all_but_1": original[:-1],
      # The right contents: only the permission is wrong.
      "unreadable": original,
      # Bad contents under a name that is not UTF-8: the error that names
      # the file must still print.
      "non_utf8_name": rng.bytes(max(len(original), 64)),
  }
  if kind == "directory":
    os.mkdir(path)
    with open(os.path.join(path, b"inside"), "wb") as f:
      f.write(original)
  elif kind == "fifo":
    os.mkfifo(path)  # Reading it would wait for a writer forever.
  else:
    with open(path, "wb") as f:
      f.write(contents[kind])
    if kind == "unreadable":
      os.chmod(path, 0)


def _make_case(templates, tmp_path, reader, position, kind):
  """Copies the reader's template and damages one file.

  Returns:
    ``(root, expected)``: the case's root for the reader, and the texts the
    message must contain (the bad file's name as messages print it).
  """
  base = os.fsencode(str(tmp_path))
  relative = os.fsencode(POSITIONS[reader][position])
  # For fixed file names (everything but the folder), the folder holding
  # them gets the name that is not UTF-8.
  root = os.path.join(base, NON_UTF8 if kind == "non_utf8_name" and
                      reader != "folder" else b"case")
  shutil.copytree(os.fsencode(templates[reader]), root)
  bad = os.path.join(root, relative)
  if kind == "non_utf8_name" and reader == "folder":
    stem, ext = os.path.splitext(bad)
    # Inserted after the stem, so the file keeps its place in sorted order.
    renamed = stem + NON_UTF8 + ext
    os.rename(bad, renamed)
    bad = renamed
  _damage(bad, kind)
  shown = data_lib.display_path(os.path.basename(bad))
  if kind == "non_utf8_name" and reader in TF_PATH_READERS:
    expected = [NON_UTF8_SHOWN, "UTF-8"]
  elif kind == "non_utf8_name":
    expected = [shown, NON_UTF8_SHOWN]
  else:
    expected = [shown]
  return os.fsdecode(root), expected


@pytest.mark.parametrize("reader,position,kind", CASES,
                         ids=["-".join(c) for c in CASES])
def test_a_bad_file_anywhere_is_one_line_naming_it(templates, tmp_path,
                                                   reader, position, kind):
  root, expected = _make_case(templates, tmp_path, reader, position, kind)
  context = (_file_permissions_enforced() if kind == "unreadable"
             else contextlib.nullcontext())
  with context:
    if kind == "unreadable":
      bad = os.path.join(os.fsencode(root),
                         os.fsencode(POSITIONS[reader][position]))
      with pytest.raises(PermissionError):  # The case is what it claims.
        open(bad, "rb").close()
    with pytest.raises(UserError) as raised:
      _read(reader, position, root)
  message = str(raised.value)
  assert message and "\n" not in message and "\r" not in message, message
  message.encode("utf-8")  # Printable: no lone surrogates.
  for text in expected:
    assert text in message, (text, message)
  assert "Traceback" not in message


# Names that are not UTF-8 where they are fine --------------------------------


def test_a_good_image_whose_name_is_not_utf8_loads(templates, tmp_path):
  root = os.path.join(os.fsencode(str(tmp_path)), b"case")
  shutil.copytree(os.fsencode(templates["folder"]), root)
  os.rename(os.path.join(root, b"train/b/1.png"),
            os.path.join(root, b"train/b/1" + NON_UTF8 + b".png"))
  data = data_lib.load_image_folder(os.fsdecode(root))
  assert data.train_images.shape == (12, 8, 8, 3)


def test_a_class_folder_whose_name_is_not_utf8_is_refused(templates,
                                                          tmp_path):
  root = os.path.join(os.fsencode(str(tmp_path)), b"case")
  shutil.copytree(os.fsencode(templates["folder"]), root)
  for split in (b"train", b"test"):
    os.rename(os.path.join(root, split, b"b"),
              os.path.join(root, split, b"b" + NON_UTF8))
  with pytest.raises(UserError, match=r"b\\xff\\xfe: its name is not valid "
                     r"UTF-8; rename it"):
    data_lib.load_image_folder(os.fsdecode(root))


# Files that parse but do not hold what the reader needs ----------------------


def _pickle_to(path, obj):
  with open(path, "wb") as f:
    pickle.dump(obj, f, protocol=2)


CIFAR_CONTENTS = {
    "not_a_dict": ("data_batch_2", [1, 2, 3], "does not hold a dict"),
    "no_labels": ("data_batch_2", {b"data": np.zeros((2, 3072), np.uint8)},
                  "has no 'labels' entry"),
    "data_not_uint8": ("test_batch", {b"data": np.zeros((2, 3072), np.int64),
                                      b"labels": [0, 1]}, "is malformed"),
    "labels_not_a_list": ("data_batch_4", {
        b"data": np.zeros((2, 3072), np.uint8), b"labels": 7}, "is malformed"),
    "labels_of_text": ("data_batch_4", {
        b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"x", b"y"]},
        "is malformed"),
    "names_not_a_list": ("batches.meta", {b"label_names": 10},
                         "has no list of label_names"),
    "name_not_utf8": ("batches.meta", {b"label_names": [b"\xff", b"b"]},
                      "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(CIFAR_CONTENTS))
def test_cifar_files_of_the_wrong_shape_are_refused(templates, tmp_path,
                                                    case):
  name, obj, text = CIFAR_CONTENTS[case]
  root = str(tmp_path / "case")
  shutil.copytree(templates["cifar"], root)
  _pickle_to(os.path.join(root, name), obj)
  with pytest.raises(UserError) as raised:
    data_lib.load_cifar10_python(root)
  assert name in str(raised.value) and text in str(raised.value)


MODEL_JSON_CONTENTS = {
    "a_list": ([], "holds no list of class_names"),
    "names_not_a_list": ({"class_names": "abcd", "image_shape": [32, 32, 3]},
                         "holds no list of class_names"),
    "shape_of_two": ({"class_names": ["a", "b"], "image_shape": [32, 32]},
                     "image_shape is [32, 32]"),
    "shape_of_text": ({"class_names": ["a", "b"],
                       "image_shape": ["32", 32, 3]}, "image_shape is"),
    "model_not_an_object": ({"class_names": ["a", "b"],
                             "image_shape": [32, 32, 3], "model": "convnet"},
                            "'model' is not an object"),
    "l2_of_text": ({"class_names": ["a", "b"], "image_shape": [32, 32, 3],
                    "model": {"name": "convnet", "l2": "big"}},
                   "model.l2 is 'big', not a float"),
    "unknown_model": ({"class_names": ["a", "b"], "image_shape": [32, 32, 3],
                       "model": {"name": "nonet", "l2": 0.0}},
                      "unknown --model='nonet'"),
    # Too small for the ConvNet's two poolings: building it fails.
    "image_too_small": ({"class_names": list(CLASSES),
                         "image_shape": [8, 8, 3],
                         "model": {"name": "convnet", "l2": 0.0}},
                        "cannot build the model"),
    # Another model's checkpoint: the files are whole, the fit is not.
    "other_classes": ({"class_names": ["a", "b", "c"],
                       "image_shape": [32, 32, 3],
                       "model": {"name": "convnet", "l2": 0.0}},
                      "cannot restore"),
}


@pytest.mark.parametrize("case", sorted(MODEL_JSON_CONTENTS))
def test_model_json_that_describes_no_model_is_refused(templates, tmp_path,
                                                       case):
  spec, text = MODEL_JSON_CONTENTS[case]
  root = str(tmp_path / "case")
  shutil.copytree(templates["model_json"], root)
  with open(os.path.join(root, "model.json"), "w") as f:
    json.dump(spec, f)
  with pytest.raises(UserError) as raised:
    export_lib.load_model_from_run(root)
  message = str(raised.value)
  assert text in message and "\n" not in message, message


def test_the_state_file_naming_a_missing_checkpoint_is_refused(templates,
                                                               tmp_path):
  root = str(tmp_path / "case")
  shutil.copytree(templates["checkpoint"], root)
  for name in os.listdir(os.path.join(root, "checkpoints")):
    if name.startswith("ckpt-5."):
      os.rename(os.path.join(root, "checkpoints", name),
                os.path.join(root, "checkpoints", name.replace("-5.", "-4.")))
  with pytest.raises(UserError, match=r"checkpoints/checkpoint names ckpt-5, "
                     r"but ckpt-5.index does not exist; pass --checkpoint=.*"
                     r"ckpt-N \(found: ckpt-4\)"):
    export_lib.load_model_from_run(root)
  _, _, path = export_lib.load_model_from_run(
      root, os.path.join(root, "checkpoints", "ckpt-4"))
  assert path.endswith("ckpt-4")
  with pytest.raises(UserError, match=r"checkpoint .*ckpt-9 does not exist "
                     r"\(no ckpt-9.index\); pass another --checkpoint="
                     r"<model_dir>/checkpoints/ckpt-N \(found: ckpt-4\)"):
    export_lib.load_model_from_run(root,
                                   os.path.join(root, "checkpoints", "ckpt-9"))


def test_unreadable_folders_are_named(templates, tmp_path):
  root = str(tmp_path / "case")
  shutil.copytree(templates["folder"], root)
  for folder in ("train/c", "test"):
    path = os.path.join(root, folder)
    os.chmod(path, 0)
    try:
      with _file_permissions_enforced():
        with pytest.raises(UserError, match=re.escape(
            f"cannot list {path} (Permission denied)")):
          data_lib.load_image_folder(root)
    finally:
      os.chmod(path, 0o755)


def test_the_folder_takes_jpeg_and_png_by_content(templates, tmp_path):
  """A GIF named .png is refused, saying what it is; a JPEG named .png and
  a PNG named .jpg load."""
  from PIL import Image as pil  # pylint: disable=import-outside-toplevel
  root = str(tmp_path / "case")
  shutil.copytree(templates["folder"], root)
  path = os.path.join(root, "test", "c", "1.png")
  pil.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, format="GIF")
  with pytest.raises(UserError, match=r"test/c/1.png is a GIF file; image "
                     r"folders take JPEG or PNG: convert it to PNG"):
    data_lib.load_image_folder(root)
  # The content decides, not the suffix.
  os.remove(path)
  shutil.copy(os.path.join(root, "test", "c", "0.jpg"), path)
  os.rename(os.path.join(root, "test", "b", "1.png"),
            os.path.join(root, "test", "b", "1.jpg"))
  assert data_lib.load_image_folder(root).test_images.shape == (12, 8, 8, 3)


# predict.py's images ---------------------------------------------------------


def test_predict_reads_each_format_and_refuses_bombs(tmp_path):
  image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), np.uint8)
  paths = []
  from PIL import Image as pil  # pylint: disable=import-outside-toplevel
  for form in ("png", "jpeg", "gif", "bmp"):
    path = str(tmp_path / f"image.{form}")
    pil.fromarray(image).save(path, format=form.upper())
    paths.append(path)
  batch = predict.load_images(paths, 32, 32, 3)
  assert batch.shape == (4, 32, 32, 3) and batch.dtype == tf.uint8

  bomb = str(tmp_path / "bomb.png")
  with open(bomb, "wb") as f:
    f.write(png_bomb())
  with pytest.raises(UserError, match=r"bomb.png claims 30000x30000 pixels"):
    predict.load_images([paths[0], bomb], 32, 32, 3)
  with pytest.raises(UserError, match=r"image.png claims 40x30 pixels .* "
                     r"limit of 1000 "):
    predict.load_images(paths, 32, 32, 3, max_image_pixels=1000)
  for bad, text in ((str(tmp_path / "nope.png"), "image file not found"),
                    (str(tmp_path), "is a folder, not a file")):
    with pytest.raises(UserError, match=text):
      predict.load_images([bad], 32, 32, 3)


# Headers read without decoding -----------------------------------------------


@pytest.mark.parametrize("height,width", [(8, 8), (17, 5), (3, 300)])
@pytest.mark.parametrize("form", ["png", "jpeg", "progressive_jpeg",
                                  "jpeg_with_exif", "gif", "bmp"])
def test_image_header_is_the_decoded_size(form, height, width):
  image = np.random.default_rng(height).integers(
      0, 256, (height, width, 3), dtype=np.uint8)
  if form == "png":
    contents = tf.io.encode_png(image).numpy()
  elif form in ("gif", "bmp"):
    from PIL import Image as pil  # pylint: disable=import-outside-toplevel
    import io
    buffer = io.BytesIO()
    pil.fromarray(image).save(buffer, format=form.upper())
    contents = buffer.getvalue()
  else:
    contents = tf.io.encode_jpeg(image, progressive=form ==
                                 "progressive_jpeg").numpy()
    if form == "jpeg_with_exif":
      # An APP1 segment before the frame header, holding marker-like bytes.
      payload = b"Exif\0\0" + b"\xff\xc0\x00\x11\x08\x99\x99\x99\x99" * 50
      contents = (contents[:2] + b"\xff\xe1" +
                  struct.pack(">H", len(payload) + 2) + payload + contents[2:])
  kind, h, w = data_lib.image_header(contents)
  decoded = tf.io.decode_image(contents, channels=3, expand_animations=False)
  assert (h, w) == tuple(decoded.shape[:2]) == (height, width)
  assert kind == {"progressive_jpeg": "jpeg",
                  "jpeg_with_exif": "jpeg"}.get(form, form)
  if kind == "jpeg":
    assert (h, w) == tuple(tf.image.extract_jpeg_shape(contents).numpy()[:2])


# Decompression bombs ---------------------------------------------------------


def png_bomb(height: int = 30000, width: int = 30000) -> bytes:
  """A PNG of a few kilobytes whose header claims ``height x width`` RGB.

  Decoding it would allocate ``height * width * 3`` bytes (2.7 GB for
  30000x30000) before reading any pixel. Only the header and a few rows of
  zeros are real: a reader must refuse it from the header alone.
  """
  def chunk(kind, body):
    return (struct.pack(">I", len(body)) + kind + body +
            struct.pack(">I", zlib.crc32(kind + body)))
  rows = (b"\0" + b"\0" * 3 * width) * 16  # Filter byte + pixels, per row.
  return (b"\x89PNG\r\n\x1a\n" +
          chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def jpeg_bomb(height: int = 30000, width: int = 30000) -> bytes:
  """A small real JPEG whose frame header is rewritten to claim
  ``height x width``."""
  contents = bytearray(tf.io.encode_jpeg(tf.zeros((8, 8, 3), tf.uint8)).numpy())
  sof = contents.index(b"\xff\xc0")
  contents[sof + 5:sof + 9] = struct.pack(">HH", height, width)
  return bytes(contents)


@pytest.mark.parametrize("bomb,name", [(png_bomb, "0.png"),
                                       (jpeg_bomb, "0.jpg")])
def test_a_decompression_bomb_is_refused_before_decoding(tmp_path,
                                                         monkeypatch, bomb,
                                                         name):
  contents = bomb()
  assert len(contents) < 200_000
  # The first train image: the old reader decoded it outside any check.
  root = str(tmp_path / "bomb")
  write_image_folder(root, classes=CLASSES, per_class=3, size=32)
  os.remove(os.path.join(root, "train", "a", "0.jpg"))
  with open(os.path.join(root, "train", "a", name), "wb") as f:
    f.write(contents)

  def no_decoding(*args, **kwargs):
    raise AssertionError("the bomb reached the decoder")

  # Refused from its header: nothing is decoded at all.
  monkeypatch.setattr(tf.io, "decode_image", no_decoding)
  with pytest.raises(UserError) as raised:
    data_lib.load(DataConfig(dataset="folder", data_dir=root))
  message = str(raised.value)
  assert f"train/a/{name} claims 30000x30000 pixels" in message
  assert str(data_lib.DEFAULT_MAX_IMAGE_PIXELS) in message
  assert "max_image_pixels" in message and "\n" not in message


def test_the_pixel_limit_is_exact_and_can_be_raised(templates, tmp_path):
  root = str(tmp_path / "case")
  shutil.copytree(templates["folder"], root)
  with pytest.raises(UserError, match=r"claims 8x8 pixels .* limit of 63 "):
    data_lib.load_image_folder(root, max_image_pixels=63)
  data = data_lib.load_image_folder(root, max_image_pixels=64)
  assert data.train_images.shape == (12, 8, 8, 3)
  # The folder source reads the limit from the configuration when it has
  # one (DataConfig.max_image_pixels).
  config = DataConfig(dataset="folder", data_dir=root)
  assert data_lib.load(config).train_images.shape == (12, 8, 8, 3)

  class WithLimit:
    dataset, data_dir, resize_images, max_image_pixels = (
        "folder", root, None, 63)

  with pytest.raises(UserError, match="limit of 63"):
    data_lib.load(WithLimit())


# Real processes --------------------------------------------------------------


def _assert_one_error_line(proc, *texts):
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), proc.stderr[-3000:]
  assert [l for l in proc.stderr.splitlines() if l.startswith("error:")] == [
      last]
  for text in texts:
    assert text in last, (text, last)


@pytest.mark.slow
def test_train_loop_on_a_non_image_first_in_train_exits_2_naming_it(
    tmp_path):
  """The finding: train/a/x.jpg, first file of the first class, is text."""
  root = tmp_path / "data"
  write_image_folder(str(root), classes=("b", "c"), per_class=2, size=32)
  (root / "train" / "a").mkdir()
  (root / "train" / "a" / "x.jpg").write_bytes(b"this is not a jpeg")
  (root / "test" / "a").mkdir()
  shutil.copy(root / "test" / "b" / "0.jpg", root / "test" / "a" / "0.jpg")
  proc = run_script("train_loop.py", "--flagfile=configs/smoke.flags",
                    "--dataset=folder", f"--data_dir={root}",
                    f"--model_dir={tmp_path / 'run'}", timeout=180)
  _assert_one_error_line(proc, f"{root}/train/a/x.jpg")


@pytest.mark.slow
def test_predict_on_a_damaged_export_exits_2_with_one_line(templates,
                                                           tmp_path):
  root = str(tmp_path / "run")
  shutil.copytree(templates["export"], root)
  data_file = os.path.join(root, "export", "variables",
                           "variables.data-00000-of-00001")
  with open(data_file, "r+b") as f:
    f.truncate(os.path.getsize(data_file) // 2)
  image = str(tmp_path / "image.png")
  tf.io.write_file(image, tf.io.encode_png(tf.zeros((32, 32, 3), tf.uint8)))
  proc = run_script("predict.py", f"--export_dir={root}/export", image,
                    timeout=120)
  _assert_one_error_line(proc, "variables.data-00000-of-00001 is damaged")
  assert proc.stdout == ""


@pytest.mark.slow
def test_export_script_on_a_damaged_checkpoint_exits_2_with_one_line(
    templates, tmp_path):
  root = str(tmp_path / "run")
  shutil.copytree(templates["checkpoint"], root)
  data_file = os.path.join(root, "checkpoints", "ckpt-5.data-00000-of-00001")
  with open(data_file, "r+b") as f:
    f.truncate(os.path.getsize(data_file) // 2)
  proc = run_script("export.py", f"--model_dir={root}",
                    f"--checkpoint={root}/checkpoints/ckpt-5",
                    f"--export_dir={tmp_path / 'out'}", timeout=120)
  _assert_one_error_line(proc, f"{data_file} is damaged")
  assert not os.path.exists(tmp_path / "out")
  # An --export_dir TensorFlow could not write: refused before any work
  # (in this process; the real one above shows the exit status).
  bad_dir = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), NON_UTF8))
  proc = run_in_process("export.py", f"--model_dir={templates['checkpoint']}",
                        f"--export_dir={bad_dir}")
  _assert_one_error_line(proc, NON_UTF8_SHOWN, "not valid UTF-8")


# TensorFlow's own PNG decoder refuses an output over 2**31 bytes, so a
# 30000x30000 bomb would not reach an allocation there; 23000x23000 RGB
# (1.5 GiB) does: the old reader decoded it (with this limit: "OOM when
# allocating tensor", a traceback).
_BOMB_SIDE = 23000
# Measured here by bisecting RLIMIT_AS: a run refusing the bomb needs
# 1.25-1.5 GiB of address space (TensorFlow's libraries and threads), a whole
# smoke training run 2.5-2.75 GiB. 2.5 GiB is 1 GiB above the refusal's need
# and short of the 1.25 + 1.5 GiB any decode of the bomb adds up to.
_ADDRESS_SPACE_LIMIT = 5 << 29


def _folder_with_bomb(tmp_path, class_name: str) -> str:
  """An image folder whose train/<class_name>/0.png is a bomb."""
  root = str(tmp_path / "bomb")
  write_image_folder(root, classes=CLASSES, per_class=3, size=32)
  os.remove(os.path.join(root, "train", class_name, "0.jpg"))
  with open(os.path.join(root, "train", class_name, "0.png"), "wb") as f:
    f.write(png_bomb(_BOMB_SIDE, _BOMB_SIDE))
  return root


@pytest.mark.slow
@pytest.mark.parametrize("class_name", ["a", "c"], ids=["first", "middle"])
def test_a_bomb_in_train_is_refused_in_bounded_memory(tmp_path, class_name):
  root = _folder_with_bomb(tmp_path, class_name)
  stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             # Address space grows with threads (stacks) and malloc arenas;
             # fixed counts keep the limit meaningful on a bigger machine.
             TF_NUM_INTEROP_THREADS="2", MALLOC_ARENA_MAX="2")
  with open(stdout, "w") as out, open(stderr, "w") as err:
    proc = subprocess.Popen(
        [sys.executable, os.path.join(SCRIPTS, "train_loop.py"),
         "--flagfile=configs/smoke.flags", "--dataset=folder",
         f"--data_dir={root}", f"--model_dir={tmp_path / 'run'}"],
        cwd=REPO, env=env, stdout=out, stderr=err,
        preexec_fn=lambda: resource.setrlimit(
            resource.RLIMIT_AS, (_ADDRESS_SPACE_LIMIT, _ADDRESS_SPACE_LIMIT)))
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    try:
      # wait4: this child's own peak memory, not every child's so far.
      _, status, usage = os.wait4(proc.pid, 0)
    finally:
      watchdog.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
  result = subprocess.CompletedProcess(proc.args, proc.returncode,
                                       stdout.read_text(), stderr.read_text())
  _assert_one_error_line(
      result, f"train/{class_name}/0.png claims {_BOMB_SIDE}x{_BOMB_SIDE} "
      f"pixels")
  peak_rss = usage.ru_maxrss * 1024  # KiB on Linux.
  print(f"peak RSS {peak_rss / 2**20:.0f} MiB under RLIMIT_AS "
        f"{_ADDRESS_SPACE_LIMIT / 2**30:.1f} GiB")
  assert peak_rss < 1 << 30
