"""gdiff command line: one flag set, one function per mode.

    python main.py --config configs/<experiment>.py --workdir <dir> --mode <mode> \
        [--config.group.key=value ...]

Modes: pipeline (the embedded digits job end to end; the default), train, train_classifier,
sample, sweep, evaluate, convert.
"""

import os

# TensorFlow (input pipeline only) must never grab accelerator memory that JAX needs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/digits.py", "Experiment configuration file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/digits", "Where checkpoints, logs, samples go.")
_MODE = flags.DEFINE_enum(
    "mode",
    "pipeline",
    ["pipeline", "train", "train_classifier", "sample", "sweep", "evaluate", "convert"],
    "What to run.",
)


def _hide_accelerators_from_tensorflow() -> None:
    try:
        import tensorflow as tf
    except ImportError:
        return
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _MODE.value == "pipeline" and not flags.FLAGS["verbosity"].present:
        # The newcomer's job prints its own stage lines and progress bars; library INFO lines
        # (orbax writes ~300 per run) would bury them. --verbosity=0 brings them back.
        logging.set_verbosity(logging.WARNING)
    from gdiff import distributed

    config = _CONFIG.value
    distributed.maybe_initialize(config.get("distributed", "auto"))
    import jax

    logging.info(
        "process %d/%d, %d local / %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.default_backend(),
    )
    mode, workdir = _MODE.value, _WORKDIR.value
    if mode in ("train", "train_classifier", "pipeline"):
        _hide_accelerators_from_tensorflow()
    if mode == "train":
        from gdiff.train import diffusion_trainer

        diffusion_trainer.train(config, workdir)
    elif mode == "train_classifier":
        from gdiff.train import classifier_trainer

        classifier_trainer.train(config, workdir)
    elif mode == "sample":
        from gdiff.sampling import run

        run.run(config, workdir)
    elif mode == "sweep":
        from gdiff.sampling import sweep

        sweep.run(config, workdir)
    elif mode == "evaluate":
        from gdiff.evaluation import evaluator

        evaluator.run(config, workdir)
    elif mode == "convert":
        from gdiff.compat import convert_checkpoint

        convert_checkpoint.run(config, workdir)
    elif mode == "pipeline":
        from gdiff.pipeline import digits

        digits.run(config, workdir)


if __name__ == "__main__":
    flags.mark_flags_as_required([])
    app.run(main)
