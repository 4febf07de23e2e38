import os
import pickle

import numpy as np
import pytest
import tensorflow as tf

from conftest import write_cifar_batches, write_image_folder
from research import data as data_lib
from research.config import DataConfig
from research.errors import UserError


# Sources ------------------------------------------------------------------


@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar10_official_layout(tmp_path, point_at):
  written = write_cifar_batches(str(tmp_path))
  root = str(tmp_path) if point_at == "parent" else str(
      tmp_path / "cifar-10-batches-py")
  data = data_lib.load(DataConfig(dataset="cifar10", data_dir=root))
  np.testing.assert_array_equal(data.train_images, written["train"][0])
  np.testing.assert_array_equal(data.train_labels, written["train"][1])
  np.testing.assert_array_equal(data.test_images, written["test"][0])
  np.testing.assert_array_equal(data.test_labels, written["test"][1])
  assert data.train_images.shape == (30, 32, 32, 3)
  assert data.class_names[0] == "airplane" and data.num_classes == 10


class _Payload:
  """Unpickling this runs ``os.system`` (classic pickle exploit)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_malicious_batch_file_is_refused_and_never_runs(tmp_path):
  write_cifar_batches(str(tmp_path))
  marker = tmp_path / "pwned"
  path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
  with open(path, "wb") as f:
    pickle.dump({b"data": _Payload(marker), b"labels": [0]}, f)
  # Sanity: the payload does run under the ordinary unpickler.
  with open(path, "rb") as f:
    pickle.load(f)
  assert marker.exists()
  marker.unlink()

  with pytest.raises(UserError, match=r"data_batch_3.*refusing to load posix.system"
                     r"|data_batch_3.*refusing to load os.system"):
    data_lib.load(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))
  assert not marker.exists()


def test_cifar10_label_out_of_range_and_missing_dir(tmp_path):
  write_cifar_batches(str(tmp_path))
  path = tmp_path / "cifar-10-batches-py" / "test_batch"
  with open(path, "wb") as f:
    pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]},
                f)
  with pytest.raises(UserError, match="label 10 of example 1"):
    data_lib.load(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))
  with pytest.raises(UserError, match="no CIFAR-10 python batches"):
    data_lib.load(DataConfig(dataset="cifar10",
                               data_dir=str(tmp_path / "nowhere")))


def test_cifar10_without_data_dir_or_network_says_where_it_looked(
    monkeypatch):
  def offline():
    raise Exception("URL fetch failure: no network")
  monkeypatch.setattr(tf.keras.datasets.cifar10, "load_data", offline)
  with pytest.raises(UserError, match=r"cifar-10-batches-py.*--data_dir"):
    data_lib.load(DataConfig(dataset="cifar10"))


def test_image_folder(tmp_path):
  write_image_folder(str(tmp_path), classes=("dog", "cat", "frog"))
  data = data_lib.load(DataConfig(dataset="folder", data_dir=str(tmp_path)))
  assert data.class_names == ("cat", "dog", "frog")  # sorted
  assert data.train_images.shape == (12, 32, 32, 3)
  assert data.train_images.dtype == np.uint8
  np.testing.assert_array_equal(data.train_labels, np.repeat([0, 1, 2], 4))
  # PNG is lossless: the decoded pixels are the written ones.
  png = tf.io.decode_png(tf.io.read_file(str(tmp_path / "test/dog/1.png")))
  np.testing.assert_array_equal(data.test_images[4 + 1], png.numpy())


def test_image_folders_of_one_size_share_one_traced_decoder(tmp_path):
  # 23x23: a size no other test decodes, so its decoder starts untraced.
  for name in ("a", "b"):
    write_image_folder(str(tmp_path / name), size=23)
    data = data_lib.load_image_folder(str(tmp_path / name))
    assert data.train_images.shape[1:] == (23, 23, 3)
  decoder = data_lib._image_decoder((23, 23), False)
  # Four reads (two folders, two splits), one trace.
  assert decoder.experimental_get_tracing_count() == 1


def test_image_folder_refuses_bad_images(tmp_path):
  write_image_folder(str(tmp_path))
  bad = tmp_path / "train" / "dog" / "broken.jpg"
  bad.write_bytes(b"this is not a jpeg")
  with pytest.raises(UserError, match="broken.jpg"):
    data_lib.load(DataConfig(dataset="folder", data_dir=str(tmp_path)))
  bad.unlink()
  odd = tmp_path / "test" / "cat" / "big.png"
  tf.io.write_file(str(odd), tf.io.encode_png(tf.zeros((40, 36, 3), tf.uint8)))
  with pytest.raises(UserError, match=r"big.png is 40x36"):
    data_lib.load(DataConfig(dataset="folder", data_dir=str(tmp_path)))
  resized = data_lib.load_image_folder(str(tmp_path), resize_to=(32, 32))
  assert resized.test_images.shape == (13, 32, 32, 3)


def test_synthetic_is_seeded_and_learnable_shaped():
  a = data_lib.make_synthetic(num_train=50, num_test=20, seed=3)
  b = data_lib.make_synthetic(num_train=50, num_test=20, seed=3)
  c = data_lib.make_synthetic(num_train=50, num_test=20, seed=4)
  np.testing.assert_array_equal(a.train_images, b.train_images)
  assert not np.array_equal(a.train_images, c.train_images)
  assert a.train_images.shape == (50, 32, 32, 3)
  assert set(np.unique(a.train_labels)) <= set(range(10))


# Pipeline ------------------------------------------------------------------


def _indexed_data(n_train=40, n_test=13):
  """Images whose first pixel encodes the example index (for order checks)."""
  def split(n):
    images = np.zeros((n, 32, 32, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    return images, (np.arange(n) % 10).astype(np.int32)
  return data_lib.ArrayData(*split(n_train), *split(n_test),
                            tuple(str(i) for i in range(10)))


def _ids(images):
  return np.round(images[..., 0, 0, 0] * 255).astype(int)


def test_train_pipeline_epochs_are_seeded_permutations():
  data = _indexed_data()
  ds = data_lib.make_train_dataset(data, global_batch_size=8, seed=5,
                                   num_epochs=3)
  batches = [(_ids(x.numpy()), y.numpy()) for x, y in ds]
  assert len(batches) == 3 * 5
  epochs = [np.concatenate([b[0] for b in batches[i * 5:(i + 1) * 5]])
            for i in range(3)]
  for e in epochs:
    assert sorted(e) == list(range(40))  # every example once per epoch
  assert not np.array_equal(epochs[0], epochs[1])  # a new order each epoch
  for ids, labels in batches:
    np.testing.assert_array_equal(labels, ids % 10)
    assert batches[0][0].dtype.kind == "i"
  again = data_lib.make_train_dataset(data, global_batch_size=8, seed=5,
                                      num_epochs=3)
  np.testing.assert_array_equal(
      np.concatenate([_ids(x.numpy()) for x, _ in again]),
      np.concatenate(epochs))


def test_train_pipeline_values_and_short_batch():
  data = _indexed_data(n_train=42)
  x, _ = next(iter(data_lib.make_train_dataset(
      data, global_batch_size=8, seed=0, num_epochs=1)))
  assert x.dtype == tf.float32 and float(tf.reduce_max(x)) <= 1.0
  dropped = list(data_lib.make_train_dataset(data, global_batch_size=8,
                                             seed=0, num_epochs=1))
  kept = list(data_lib.make_train_dataset(data, global_batch_size=8, seed=0,
                                          num_epochs=1, drop_remainder=False))
  assert [len(b[1]) for b in dropped] == [8] * 5
  assert [len(b[1]) for b in kept] == [8] * 5 + [2]
  assert data_lib.steps_per_epoch(42, 8, True) == 5
  assert data_lib.steps_per_epoch(42, 8, False) == 6
  with pytest.raises(UserError, match="exceeds"):
    data_lib.steps_per_epoch(4, 8, True)


@pytest.mark.parametrize("cutout", [0, 5])
def test_resuming_at_a_step_replays_exactly_the_rest(cutout):
  data = _indexed_data()
  kwargs = dict(global_batch_size=8, seed=2, num_epochs=3, augment=True,
                cutout=cutout)
  full = [x.numpy() for x, _ in data_lib.make_train_dataset(data, **kwargs)]
  for start in (0, 3, 5, 7, 14):
    rest = [x.numpy() for x, _ in data_lib.make_train_dataset(
        data, start_step=start, **kwargs)]
    assert len(rest) == len(full) - start
    for a, b in zip(rest, full[start:]):
      np.testing.assert_array_equal(a, b)


def test_augmenting_pixels_is_exactly_augmenting_their_floats():
  """The step may augment uint8 pixels on its device (data.preprocess):
  crops, zero padding and flips move values without arithmetic."""
  data = data_lib.make_synthetic(num_train=64, num_test=8, seed=0)
  pixels = tf.constant(data.train_images[:16])
  offsets = tf.random.stateless_uniform([16, 2], [1, 2], maxval=9,
                                        dtype=tf.int32)
  flips = tf.random.stateless_uniform([16], [3, 4]) < 0.5
  got = data_lib.preprocess(pixels, offsets, flips).numpy()
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, data_lib._augment(  # pylint: disable=protected-access
      data_lib.to_float(pixels), offsets, flips).numpy())
  assert not np.array_equal(got, data_lib.to_float(pixels).numpy())


def test_augmentation_crops_and_flips_within_padding():
  data = data_lib.make_synthetic(num_train=64, num_test=8, seed=0)
  plain = data_lib.make_train_dataset(data, global_batch_size=64, seed=1,
                                      num_epochs=1)
  aug = data_lib.make_train_dataset(data, global_batch_size=64, seed=1,
                                    num_epochs=1, augment=True)
  (x, y), (xa, ya) = next(iter(plain)), next(iter(aug))
  np.testing.assert_array_equal(y, ya)
  assert xa.shape == x.shape
  x, xa = x.numpy(), xa.numpy()
  # Every augmented image is a shifted (by <= 4 px) and maybe mirrored copy.
  for img, got in zip(x, xa):
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)))
    found = any(
        np.array_equal(got, cand[r:r + 32, c:c + 32])
        for cand in (padded, padded[:, ::-1])
        for r in range(9) for c in range(9))
    assert found
  assert not np.array_equal(x, xa)


def test_cutout_zeroes_one_clipped_square_of_the_augmented_image():
  data = data_lib.make_synthetic(num_train=64, num_test=8, seed=0)
  data = data_lib.ArrayData(np.maximum(data.train_images, 1),  # No 0 yet.
                            data.train_labels, data.test_images,
                            data.test_labels, data.class_names)
  kwargs = dict(global_batch_size=64, seed=1, num_epochs=1, augment=True)
  xa, _ = next(iter(data_lib.make_train_dataset(data, **kwargs)))
  xc, _ = next(iter(data_lib.make_train_dataset(data, cutout=8, **kwargs)))
  pixels, _, offsets, flips, boxes = next(iter(data_lib.make_train_dataset(
      data, cutout=8, preprocess_in_pipeline=False, **kwargs)))
  # The step's path (on a device) gives the pipeline's images.
  np.testing.assert_array_equal(
      data_lib.preprocess(pixels, offsets, flips, boxes).numpy(), xc)
  xa, xc, boxes = xa.numpy(), xc.numpy(), boxes.numpy()
  # The same crops and flips; then the box, and only the box, is zero.
  for image, cut, (top, left, bottom, right) in zip(xa, xc, boxes):
    assert 0 <= top < bottom <= 32 and 0 <= left < right <= 32
    # An 8x8 square centered on a pixel (its corner 4 up and left),
    # clipped by the image's borders.
    assert bottom - top == min(bottom, 32 - top, 8)
    assert right - left == min(right, 32 - left, 8)
    inside = np.zeros((32, 32), bool)
    inside[top:bottom, left:right] = True
    assert np.all(cut[inside] == 0)
    np.testing.assert_array_equal(cut[~inside], image[~inside])
  assert len({tuple(b) for b in boxes}) > 32  # Drawn per image.
  with pytest.raises(ValueError, match="cutout needs augment"):
    data_lib.make_train_dataset(data, global_batch_size=8, seed=1,
                                num_epochs=1, cutout=8)


# The validation split -------------------------------------------------------


def _uneven_data():
  """200 training examples, classes of 5 to 25, each image's first pixel
  its index."""
  labels = np.repeat(np.arange(10), [5, 10, 15, 20, 25, 25, 25, 25, 25, 25])
  labels = np.random.default_rng(0).permutation(labels).astype(np.int32)
  images = np.zeros((200, 32, 32, 3), np.uint8)
  images[:, 0, 0, 0] = np.arange(200)
  return data_lib.ArrayData(images, labels, images[:8], labels[:8],
                            tuple(str(i) for i in range(10)))


def _pixel_ids(images):
  return images[:, 0, 0, 0].astype(int)


def test_the_validation_split_is_stratified_disjoint_and_fixed():
  data = _uneven_data()
  split = data_lib.split_validation(data, 33)
  train, held = _pixel_ids(split.train_images), _pixel_ids(
      split.validation_images)
  assert not set(train) & set(held)
  assert sorted(np.concatenate([train, held])) == list(range(200))
  assert list(train) == sorted(train)  # The training order is kept.
  np.testing.assert_array_equal(split.train_labels, data.train_labels[train])
  np.testing.assert_array_equal(split.validation_labels,
                                data.train_labels[held])
  # Each class its share of 33: 0.165 of [5, 10, 15, 20, 25 x 6] is
  # [0.8, 1.7, 2.5, 3.3, 4.1 x 6]; floors add to 30, the three largest
  # remainders (classes 0, 1, 2) take one more.
  np.testing.assert_array_equal(np.bincount(split.validation_labels),
                                [1, 2, 3, 3, 4, 4, 4, 4, 4, 4])
  again = data_lib.split_validation(data, 33)
  np.testing.assert_array_equal(again.validation_images,
                                split.validation_images)
  assert data_lib.split_validation(data, 0) is data
  assert split.eval_set_names == ("validation", "test")
  assert data.eval_set_names == ("test",)
  with pytest.raises(UserError, match="no evaluation set 'validation'"):
    data.eval_set("validation")


@pytest.mark.parametrize("workers,replicas", [(1, 1), (2, 2)])
def test_no_validation_example_is_trained_on_for_any_seed_or_worker(
    workers, replicas):
  split = data_lib.split_validation(_uneven_data(), 40)
  held = set(_pixel_ids(split.validation_images))
  train = set(_pixel_ids(split.train_images))
  for seed in (0, 7):
    for start_step in (0, 9):  # A fresh run and a resumed one.
      seen = set()
      for w in range(workers):
        context = _FakeContext(workers, w, replicas) if replicas > 1 else None
        for x, _ in data_lib.make_train_dataset(
            split, global_batch_size=8, seed=seed, num_epochs=2,
            start_step=start_step, input_context=context):
          seen |= set(_ids(x.numpy()))
      assert not seen & held
      assert seen == train


def test_a_split_that_does_not_fit_is_refused():
  data = _uneven_data()
  with pytest.raises(UserError, match=r"--validation_size=200 must be in "
                     r"\[0, 200\)"):
    data_lib.split_validation(data, 200)
  # Class 0 has 5 examples; 190 of 200 takes all 5.
  with pytest.raises(UserError, match="--validation_size=190 leaves no "
                     "training example of class 0"):
    data_lib.split_validation(data, 190)


class _FakeContext:
  """Stands in for ``tf.distribute.InputContext`` (pure arithmetic)."""

  def __init__(self, pipelines, pipeline_id, replicas):
    self.num_input_pipelines = pipelines
    self.input_pipeline_id = pipeline_id
    self.num_replicas_in_sync = replicas

  def get_per_replica_batch_size(self, global_batch_size):
    return global_batch_size // self.num_replicas_in_sync


@pytest.mark.parametrize("workers,replicas", [(1, 2), (2, 2), (2, 4)])
def test_replica_slices_reassemble_the_global_batch(workers, replicas):
  data = _indexed_data()
  kwargs = dict(global_batch_size=8, seed=4, num_epochs=2)
  whole = [_ids(x.numpy()) for x, _ in data_lib.make_train_dataset(
      data, **kwargs)]
  per_worker = [
      [_ids(x.numpy()) for x, _ in data_lib.make_train_dataset(
          data, input_context=_FakeContext(workers, w, replicas), **kwargs)]
      for w in range(workers)]
  local = replicas // workers
  for step, expected in enumerate(whole):
    pieces = [per_worker[w][step * local + r]
              for w in range(workers) for r in range(local)]
    np.testing.assert_array_equal(np.concatenate(pieces), expected)


# Each worker's real examples: the global batches (8 of 13 examples, then 5
# and 3 padding rows) are cut into replica slices of 2 in order, and a worker
# holds its 2 replicas' slices.
EVAL_SHARES = {(1, 1): [range(13)], (1, 2): [range(13)],
               (2, 4): [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12]]}


@pytest.mark.parametrize("workers,replicas", sorted(EVAL_SHARES))
def test_eval_covers_every_example_once(workers, replicas):
  data = _indexed_data(n_test=13)
  seen = []
  for w in range(workers):
    ctx = _FakeContext(workers, w, replicas) if replicas > 1 else None
    elements = list(data_lib.make_eval_dataset(data, global_batch_size=8,
                                               input_context=ctx))
    assert len(elements) == data_lib.eval_steps(13, 8) * (replicas // workers)
    # Every replica batch is full (the last one padded, weight 0): no
    # replica ever gets an empty batch.
    assert all(len(x) == 8 // replicas for x, _, _ in elements)
    share = list(EVAL_SHARES[workers, replicas][w])
    real = [_ids(x.numpy())[weight.numpy() == 1]
            for x, _, weight in elements]
    assert sorted(np.concatenate(real)) == share
    # Padding rows weigh 0: the weights add up to the real examples.
    assert sum(float(np.sum(weight)) for _, _, weight in elements) == len(
        share)
    seen += real
  assert sorted(np.concatenate(seen)) == list(range(13))
