#!/usr/bin/env python3
"""Trains a registered model (default: the CIFAR-10 ConvNet) with the custom
tf.distribute loop.

  python scripts/train_loop.py --flagfile=configs/cifar10.flags [--flag=value ...]

Flags given after the flagfile override it. Re-running with the same
--model_dir resumes from its latest checkpoint.
"""

from __future__ import annotations

import os
import sys

# Quiet TensorFlow's C++ start-up chatter; must precede the import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

import cli_common as cli  # noqa: E402  (scripts/cli_common.py)
from research import options  # noqa: E402
from research.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags and their validators on ``fv``."""
  cli.define_data_flags(fv, default_dataset="cifar10",
                        synthetic_train_size=1024, synthetic_test_size=256)
  flags.DEFINE_string("model_dir", None,
                      "Run directory for event files, checkpoints and "
                      "metrics.json (default: logs/<run_name>).",
                      flag_values=fv)
  flags.DEFINE_string("run_name", None,
                      "Run name for the default model_dir (default: "
                      "<dataset>-<date>-<time>).", flag_values=fv)
  cli.define_model_flags(fv, l2_help="Kernel L2 regularization factor.")
  flags.DEFINE_integer("epochs", 10, "Training epochs.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 32,
                       "Global batch size (over all replicas).",
                       flag_values=fv)
  flags.DEFINE_integer("per_replica_batch_size", 0,
                       "If > 0, the global batch is this times the number of "
                       "replicas (overrides --batch_size).", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_float("learning_rate", 0.001,
                     "Base learning rate (the peak of a schedule).",
                     flag_values=fv)
  flags.DEFINE_enum("optimizer", "adam", options.OPTIMIZERS,
                    "adam, adamw (decoupled weight decay) or sgd (momentum).",
                    flag_values=fv)
  flags.DEFINE_float("weight_decay", 0.0,
                     "Decoupled weight decay (x learning rate per step); "
                     "adamw's, or Keras' for adam and sgd. 0: off.",
                     flag_values=fv)
  flags.DEFINE_float("momentum", 0.9, "sgd: momentum.", flag_values=fv)
  flags.DEFINE_bool("nesterov", False, "sgd: Nesterov momentum.",
                    flag_values=fv)
  flags.DEFINE_float("ema_decay", 0.0,
                     "Keep an exponential moving average of the weights with "
                     "this decay (e.g. 0.999); evaluation, --best_metric and "
                     "the export use it. 0: off.", flag_values=fv)
  flags.DEFINE_enum("lr_schedule", "constant", options.LR_SCHEDULES,
                    "Learning-rate decay over the whole run, after warmup "
                    "(formulas in research/optim.py).", flag_values=fv)
  flags.DEFINE_integer("warmup_steps", 0,
                       "Linear warmup from ~0 to --learning_rate.",
                       flag_values=fv)
  flags.DEFINE_float("lr_decay_rate", 0.1,
                     "step/exponential: factor per --lr_decay_steps.",
                     flag_values=fv)
  flags.DEFINE_integer("lr_decay_steps", 0,
                       "step/exponential: steps per --lr_decay_rate (0: step "
                       "drops at 1/3 and 2/3 of training, exponential reaches "
                       "the rate at the end).", flag_values=fv)
  flags.DEFINE_float("label_smoothing", 0.0,
                     "Smoothing of the training targets (eval loss stays the "
                     "plain cross-entropy).", flag_values=fv)
  flags.DEFINE_float("clip_grad_norm", 0.0,
                     "Clip the global gradient (over all replicas) to this "
                     "L2 norm; 0: off.", flag_values=fv)
  flags.DEFINE_integer("histogram_every_steps", 0,
                       "Weight and gradient histograms every N steps (at the "
                       "end of the loop that reaches N); 0: off.",
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_integer("eval_images", 24,
                       "Images of each evaluated set shown with predictions "
                       "in TensorBoard after each evaluation (0: none).",
                       lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_string("profile_steps", None,
                      "FIRST,LAST: record a profiler trace of these global "
                      "steps (TensorBoard's Profile tab; see BUILD.md).",
                      flag_values=fv)
  flags.DEFINE_bool("export", True,
                    "Write a serving SavedModel to <model_dir>/export at the "
                    "end.", flag_values=fv)
  flags.DEFINE_bool("flip_average", False,
                    "Test-time augmentation: evaluate and export the mean of "
                    "the logits of each image and its left-right mirror.",
                    flag_values=fv)
  flags.DEFINE_integer("shift_average", 0,
                       "Test-time augmentation: also average over each image "
                       "moved this many pixels up, down, left and right "
                       "(zeros moved in, as in the training crops; 0: not).",
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of initialization, data order and "
                       "augmentation.", flag_values=fv)
  flags.DEFINE_integer("steps_per_loop", 100,
                       "Training steps per tf.function call.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("eval_every_steps", 0,
                       "Also evaluate every N steps (0: after each epoch "
                       "only).", lower_bound=0, flag_values=fv)
  flags.DEFINE_integer("validation_size", 0,
                       "Training examples held out as the validation set "
                       "(stratified by class, the same for every --seed); 0 "
                       "for none.", lower_bound=0, flag_values=fv)
  flags.DEFINE_list("eval_sets", None,
                    "Sets evaluated during training: "
                    f"{','.join(options.EVAL_SETS)} or one the dataset adds "
                    "(default: validation "
                    "with --validation_size, else test; --eval_sets= : none, "
                    "the final evaluation only).", flag_values=fv)
  flags.DEFINE_list("final_eval_sets", None,
                    "Sets evaluated once at the end (default: validation,"
                    "test with --validation_size, else test; --final_eval_sets= "
                    ": none).",
                    flag_values=fv)
  flags.DEFINE_bool("eval_in_loop", True,
                    "Evaluate during and at the end of training; "
                    "--noeval_in_loop leaves all evaluation to a sidecar "
                    "(scripts/evaluate.py --continuous).", flag_values=fv)
  flags.DEFINE_string("best_metric", None,
                      "SET/METRIC to select on, e.g. validation/accuracy "
                      "(metrics: " + ", ".join(options.METRIC_DIRECTIONS) +
                      "): its best evaluation is kept in <model_dir>/best/ "
                      "and exported.", flag_values=fv)
  flags.DEFINE_integer("early_stopping_patience", 0,
                       "Stop after N evaluations without an improvement of "
                       "--best_metric (0: never).", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_float("early_stopping_min_delta", 0.0,
                     "The improvement of --best_metric that counts.",
                     lower_bound=0.0, flag_values=fv)
  flags.DEFINE_integer("checkpoint_every_steps", 1000,
                       "Save a checkpoint every N steps (0: at the end only).",
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_integer("keep_checkpoints", 3, "Newest checkpoints to keep.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_bool("augment", False,
                    "Random crop (4-pixel padding) and horizontal flip.",
                    flag_values=fv)
  flags.DEFINE_integer("cutout", 0,
                       "With --augment: also zero a random SIZE x SIZE square "
                       "of each training image (cutout; its center uniform "
                       "over the image, clipped at the borders). 0: none.",
                       flag_values=fv)
  flags.DEFINE_bool("keep_short_batch", False,
                    "Keep each epoch's last short training batch.",
                    flag_values=fv)
  flags.DEFINE_string("resize_images", None,
                      "folder: resize every image to HxW (e.g. 32x32); "
                      "without it, images of mixed sizes are refused.",
                      flag_values=fv)
  flags.DEFINE_integer("max_image_pixels", options.DEFAULT_MAX_IMAGE_PIXELS,
                       "folder: refuse an image whose header claims more "
                       "pixels (height x width) than this, before decoding "
                       "it (a decompression bomb).", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_bool("deterministic", False,
                    "Seed everything and enable op determinism: two runs of "
                    "the same command give bitwise-identical weights.",
                    flag_values=fv)
  flags.DEFINE_enum("nan_policy", "stop", options.NAN_POLICIES,
                    "A step with a non-finite loss or gradient: stop (exit 3, "
                    "save nothing) or skip its update and count it.",
                    flag_values=fv)
  flags.DEFINE_enum("mixed_precision", "float32", options.PRECISIONS,
                    "Keras dtype policy; mixed_float16 adds a "
                    "LossScaleOptimizer. Logits and loss stay float32.",
                    flag_values=fv)
  flags.DEFINE_enum("jit_compile", "auto", options.JIT_COMPILE,
                    "XLA for the steps; auto: on for one GPU under "
                    "OneDeviceStrategy without --deterministic, off "
                    "otherwise (research.distribute.auto_jit_compile).",
                    flag_values=fv)
  flags.DEFINE_enum("strategy", "auto", options.STRATEGIES,
                    "Distribution strategy.", flag_values=fv)
  flags.DEFINE_integer("num_gpus", None,
                       "Use at most this many GPUs, for every strategy; the "
                       "others are hidden from TensorFlow (their memory is "
                       "not taken).", lower_bound=0, flag_values=fv)
  flags.DEFINE_bool("gpu_memory_growth", False,
                    "Take GPU memory as needed instead of all of it at start "
                    "(for several processes on one GPU; "
                    "TF_FORCE_GPU_ALLOW_GROWTH=true does the same).",
                    flag_values=fv)
  flags.DEFINE_integer("cpu_replicas", 0,
                       "Split the CPU into N logical devices and mirror over "
                       "them (for multi-replica runs without GPUs).",
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_string("tpu", "", "TPU name or address (--strategy=tpu).",
                      flag_values=fv)
  cli.register_validators(fv)


def run(fv: flags.FlagValues, argv: list[str]) -> None:
  """Trains as the parsed flags ``fv`` say; exits with a status on errors.

  Args:
    fv: This script's parsed flags.
    argv: The command line, for the run record.
  """
  # TensorFlow loads only now, after the flags were validated, so a bad flag
  # is reported without its start-up chatter.
  from research import data as data_lib
  from research import distribute
  from research import preemption
  try:
    model_dir = cli.resolve_model_dir(fv)
    distribute.configure_devices(cpu_replicas=fv.cpu_replicas,
                                 num_gpus=fv.num_gpus,
                                 gpu_memory_growth=fv.gpu_memory_growth)
    strategy = distribute.create_strategy(
        fv.strategy, num_gpus=fv.num_gpus, cpu_replicas=fv.cpu_replicas,
        tpu=fv.tpu)
    config = cli.train_config_from_flags(fv, model_dir=model_dir,
                                         strategy=strategy)
    print(f"strategy: {distribute.describe(strategy)}", flush=True)
    print(f"model_dir: {model_dir}", flush=True)
    if (config.step.mixed_precision == "mixed_bfloat16" and
        distribute.device_type(strategy) == "CPU" and
        distribute.cpu_has_native_bfloat16() is False):
      native = " or ".join(distribute.NATIVE_BFLOAT16_CPU_FLAGS)
      sys.stderr.write(f"warning: this CPU has no native bfloat16 ({native} "
                       f"in /proc/cpuinfo): mixed_bfloat16 trains slower "
                       f"than float32 here\n")
    data = data_lib.load(config.data, seed=config.seed)
    from research import run_record
    from research import train as train_lib
    metrics = train_lib.train(
        config, strategy=strategy, data=data,
        log=lambda line: print(line, flush=True),
        run_files={"flags.json": fv.flag_values_dict()},
        run_record=run_record.collect(argv))
  except UserError as e:
    cli.exit_with_error(str(e), status=e.exit_status)
  except preemption.Preempted as e:
    sys.stderr.write(f"{e}; run the same command to resume\n")
    sys.exit(e.exit_status)
  except KeyboardInterrupt:
    # A second Ctrl-C while the first one's checkpoint was pending.
    sys.stderr.write("aborted by a second Ctrl-C; nothing saved since the "
                     "last checkpoint; run the same command to resume\n")
    sys.exit(options.INTERRUPTED_EXIT_STATUS)
  if metrics.get("eval_accuracy") is None:  # Nothing evaluated at the end.
    print(f"done: step {metrics['global_step']} in "
          f"{metrics['wall_seconds']:.0f}s, nothing evaluated", flush=True)
    return
  # Runs recorded before evaluation sets evaluated the test set.
  print(f"done: {metrics.get('eval_set', 'test')} accuracy "
        f"{metrics['eval_accuracy']:.4f} "
        f"loss {metrics['eval_loss']:.4f} at step {metrics['global_step']} "
        f"in {metrics['wall_seconds']:.0f}s", flush=True)


def main(argv):
  del argv  # The flags hold everything; the record takes the raw command.
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # absl's INFO is TF's noise.
  run(FLAGS, sys.argv)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_or_exit)
