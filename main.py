"""gdiff command line: one flag set, one function per mode.

    python main.py --config configs/<experiment>.py --workdir <dir> --mode <mode> \
        [--config.group.key=value ...]

Modes: pipeline (the embedded digits job end to end; the default), train, train_classifier,
sample, sweep, evaluate, convert.
"""

import os

# TensorFlow (input pipeline only) must never grab accelerator memory that JAX needs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from gdiff import distributed  # noqa: E402
from gdiff.compat import convert_checkpoint  # noqa: E402
from gdiff.evaluation import evaluator  # noqa: E402
from gdiff.pipeline import digits  # noqa: E402
from gdiff.sampling import run, sweep  # noqa: E402
from gdiff.train import classifier_trainer, diffusion_trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/digits.py", "Experiment configuration file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/digits", "Where checkpoints, logs, samples go.")
# mode -> fn(config, workdir). Importing these builds no arrays, so jax.distributed can still be
# initialised in main() before the first computation.
MODES = {
    "pipeline": digits.run,
    "train": diffusion_trainer.train,
    "train_classifier": classifier_trainer.train,
    "sample": run.run,
    "sweep": sweep.run,
    "evaluate": evaluator.run,
    "convert": convert_checkpoint.run,
}
_MODE = flags.DEFINE_enum("mode", "pipeline", list(MODES), "What to run.")


def _hide_accelerators_from_tensorflow() -> None:
    # The one deferred import: TensorFlow is only the input pipeline's, and heavy.
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
    config = _CONFIG.value
    distributed.maybe_initialize(config.distributed)
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
    MODES[mode](config, workdir)


if __name__ == "__main__":
    flags.mark_flags_as_required([])
    app.run(main)
