"""Names of the choices the library accepts.

Importable without TensorFlow, so scripts can define and validate their flags
(and report a bad one) before TensorFlow loads.
"""

DATASETS = ("cifar10", "folder", "synthetic")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
FAULTS = ("none", "unscaled_loss", "unscaled_regularization")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "step", "exponential")
