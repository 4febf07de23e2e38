"""One export, loaded by every loader a deployment uses, gives the same numbers.

The loaders: ``tf.saved_model.load`` in an interpreter that cannot import this
package, ``saved_model_cli run`` (TensorFlow Serving's graph loader, which an
export of a ``tf.Module`` holding the Keras model fails: keras-team/keras#19274),
``keras.layers.TFSMLayer``, and the TFLite converter and interpreter. Each must
give the in-process Keras model's probabilities on the same uint8 images.

The model is a seeded, untrained ``ConvNet``: loading does not care whether
the weights were trained. ``load_elsewhere`` and ``saved_model_cli_run`` are
shared with test_export.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_script
from research import data as data_lib
from research import export as export_lib
from research import model as model_lib
from research.errors import UserError

# saved_model_cli, TFLite and fresh interpreters.
pytestmark = pytest.mark.slow

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
               "horse", "ship", "truck")
IMAGE_SHAPE = (32, 32, 3)
# Float tolerance between loaders: same weights, same ops, other kernels.
RTOL, ATOL = 1e-5, 1e-6

_LOAD_WITHOUT_RESEARCH = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    loaded = tf.saved_model.load(sys.argv[1])
    out = loaded.signatures["serving_default"](
        images=tf.constant(np.load(sys.argv[2])))
    names = loaded.signatures["top_class_names"](top_class=out["top_class"])
    np.savez(sys.argv[3], probabilities=out["probabilities"].numpy(),
             top_class=out["top_class"].numpy(),
             class_names=[n.decode() for n in loaded.class_names.numpy()],
             top_class_names=[n.decode() for n in names["class_names"].numpy()])
    assert not any(m == "research" or m.startswith("research.")
                   for m in sys.modules), "the export needed this package"
""")


def load_elsewhere(tmp_path, export_dir, images):
  """Runs the export's signatures in a fresh interpreter without `research`.

  Returns:
    The ``.npz`` of ``probabilities``, ``top_class``, ``class_names`` (the
    loaded object's variable) and ``top_class_names`` (the names signature
    applied to ``top_class``).
  """
  np.save(tmp_path / "images.npy", images)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  # A fresh interpreter in an empty folder: `research` is not importable.
  proc = subprocess.run(
      [sys.executable, "-c", _LOAD_WITHOUT_RESEARCH, export_dir,
       str(tmp_path / "images.npy"), str(tmp_path / "out.npz")],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return np.load(tmp_path / "out.npz")


def saved_model_cli_run(tmp_path, export_dir, signature, **inputs):
  """``saved_model_cli run`` on ``inputs`` (name -> array); its outputs.

  The CLI loads the export with the C++ graph loader TensorFlow Serving uses
  (not Python's object graph) and writes each output to ``<name>.npy``.
  """
  cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  arrays = []
  for name, value in inputs.items():
    np.save(tmp_path / f"{signature}-{name}.npy", value)
    arrays.append(f"{name}={tmp_path / f'{signature}-{name}.npy'}")
  outdir = tmp_path / f"{signature}-out"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(
      [cli, "run", "--dir", export_dir, "--tag_set", "serve",
       "--signature_def", signature, "--inputs", ";".join(arrays),
       "--outdir", str(outdir), "--overwrite"],
      env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {f[:-len(".npy")]: np.load(outdir / f, allow_pickle=True)
          for f in os.listdir(outdir)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """``(model, export_dir, images, probabilities)``: one export for all tests.

  ``probabilities`` are the in-process Keras model's on ``images``.
  """
  tf.keras.utils.set_random_seed(15)
  model = model_lib.build(model_lib.ConvNet(num_classes=len(CLASS_NAMES)),
                          IMAGE_SHAPE)
  rng = np.random.default_rng(15)
  # Keras starts biases at zero, so a loader that lost them would still agree.
  for weight in model.weights:
    if "bias" in weight.path:
      weight.assign(rng.uniform(-0.5, 0.5, weight.shape).astype(np.float32))
  export_dir = str(tmp_path_factory.mktemp("serving") / "export")
  export_lib.export_saved_model(model, export_dir, class_names=CLASS_NAMES,
                                image_shape=IMAGE_SHAPE)
  images = rng.integers(0, 256, (4, *IMAGE_SHAPE), dtype=np.uint8)
  images[0], images[1] = 0, 255  # The ends of the uint8 -> [0, 1] scaling.
  probabilities = tf.nn.softmax(
      model(data_lib.to_float(images), training=False)).numpy()
  return model, export_dir, images, probabilities


def _check(out, expected):
  np.testing.assert_allclose(out["probabilities"], expected, rtol=RTOL,
                             atol=ATOL)
  np.testing.assert_array_equal(out["top_class"], expected.argmax(axis=1))
  assert out["probabilities"].dtype == np.float32
  assert out["top_class"].dtype == np.int32


def test_tf_saved_model_load_without_this_package(exported, tmp_path):
  _, export_dir, images, expected = exported
  out = load_elsewhere(tmp_path, export_dir, images)
  _check(out, expected)
  assert list(out["class_names"]) == list(CLASS_NAMES)
  assert list(out["top_class_names"]) == [
      CLASS_NAMES[i] for i in expected.argmax(axis=1)]


def test_saved_model_cli_the_graph_loader_of_tf_serving(exported, tmp_path):
  _, export_dir, images, expected = exported
  out = saved_model_cli_run(tmp_path, export_dir, "serving_default",
                            images=images)
  assert sorted(out) == ["probabilities", "top_class"]
  _check(out, expected)
  names = saved_model_cli_run(tmp_path, export_dir, "top_class_names",
                              top_class=out["top_class"])
  assert [n.decode() for n in names["class_names"]] == [
      CLASS_NAMES[i] for i in expected.argmax(axis=1)]


def test_tfsm_layer_alone_and_inside_a_keras_model(exported):
  _, export_dir, images, expected = exported
  layer = tf.keras.layers.TFSMLayer(export_dir,
                                    call_endpoint="serving_default")
  _check({k: v.numpy() for k, v in layer(images).items()}, expected)
  # The way it is meant to be used: a layer of a new Keras model.
  inputs = tf.keras.Input(IMAGE_SHAPE, dtype="uint8")
  wrapper = tf.keras.Model(inputs, layer(inputs)["probabilities"])
  np.testing.assert_allclose(wrapper.predict(images, verbose=0), expected,
                             rtol=RTOL, atol=ATOL)


# tf.lite.Interpreter warns that ai_edge_litert's Interpreter (same API) will
# replace it; it is still TensorFlow's own, and what most deployments call.
@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_tflite_converter_and_interpreter(exported):
  _, export_dir, images, expected = exported
  flatbuffer = tf.lite.TFLiteConverter.from_saved_model(export_dir).convert()
  # The classic API runs the first signature, which is serving_default
  # (the converter orders signatures by name).
  interpreter = tf.lite.Interpreter(model_content=flatbuffer)
  (image_input,) = interpreter.get_input_details()
  assert image_input["dtype"] == np.uint8
  assert list(image_input["shape_signature"]) == [-1, *IMAGE_SHAPE]
  interpreter.resize_tensor_input(image_input["index"], images.shape)
  interpreter.allocate_tensors()
  interpreter.set_tensor(image_input["index"], images)
  interpreter.invoke()
  # Classic output names are graph names; the dtypes tell the two apart.
  out = {{np.float32: "probabilities", np.int32: "top_class"}[d["dtype"]]:
         interpreter.get_tensor(d["index"])
         for d in interpreter.get_output_details()}
  _check(out, expected)
  # The signature API, which resizes by itself, reaches both signatures.
  runner = interpreter.get_signature_runner("serving_default")
  _check(runner(images=images), expected)
  names = interpreter.get_signature_runner("top_class_names")(
      top_class=out["top_class"])
  assert [n.decode() for n in names["class_names"]] == [
      CLASS_NAMES[i] for i in expected.argmax(axis=1)]


def test_export_layout_signatures_and_class_names_file(exported):
  _, export_dir, _, _ = exported
  with open(os.path.join(export_dir, "assets.extra", "class_names.txt"),
            encoding="utf-8") as f:
    assert f.read().splitlines() == list(CLASS_NAMES)
  loaded = tf.saved_model.load(export_dir)
  assert sorted(loaded.signatures) == ["serving_default", "top_class_names"]
  serve = loaded.signatures["serving_default"]
  (images_spec,) = serve.structured_input_signature[1].values()
  assert images_spec == tf.TensorSpec([None, *IMAGE_SHAPE], tf.uint8,
                                      name="images")
  outputs = serve.structured_outputs
  assert outputs["probabilities"].dtype == tf.float32
  assert outputs["probabilities"].shape.as_list() == [None, len(CLASS_NAMES)]
  assert outputs["top_class"].dtype == tf.int32
  # Each weight is saved once (tracking the Keras model too would save every
  # weight twice), plus the class names.
  saved = [name for name, _ in tf.train.list_variables(
      os.path.join(export_dir, "variables", "variables"))
           if name.endswith("VARIABLE_VALUE")]
  assert len(saved) == len(exported[0].weights) + 1
  assert not [p for p in os.listdir(os.path.dirname(export_dir))
              if p.startswith(".export")]


def test_a_failed_export_leaves_the_previous_one(exported, tmp_path,
                                                 monkeypatch):
  model, export_dir, _, _ = exported
  target = str(tmp_path / "export")
  shutil.copytree(export_dir, target)
  with open(os.path.join(target, "saved_model.pb"), "rb") as f:
    before = f.read()

  def disk_full(obj, path, *args, **kwargs):
    os.makedirs(path)
    with open(os.path.join(path, "saved_model.pb"), "wb") as f:
      f.write(b"half")
    raise tf.errors.ResourceExhaustedError(None, None,
                                           "No space left on device")

  monkeypatch.setattr(tf.saved_model, "save", disk_full)
  with pytest.raises(UserError) as e:
    export_lib.export_saved_model(model, target, class_names=CLASS_NAMES,
                                  image_shape=IMAGE_SHAPE)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"could not export the model to {target} (No "
                            f"space left on device)")
  with open(os.path.join(target, "saved_model.pb"), "rb") as f:
    assert f.read() == before
  assert sorted(os.listdir(tmp_path)) == ["export"]


def test_predict_script_reads_the_export(exported, tmp_path):
  _, export_dir, images, expected = exported
  paths = []
  for i in range(2):
    paths.append(str(tmp_path / f"image{i}.png"))
    tf.io.write_file(paths[-1], tf.io.encode_png(images[i]))
  proc = run_script("predict.py", f"--export_dir={export_dir}", "--top_k=1",
                    *paths, check=True)
  top = expected.argmax(axis=1)
  assert proc.stdout.splitlines() == [
      f"{path}: {CLASS_NAMES[top[i]]} {expected[i, top[i]]:.3f}"
      for i, path in enumerate(paths)]
