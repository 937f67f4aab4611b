"""The gdiff command line: one flag set, one function per mode.

    gdiff --config <experiment> --workdir <dir> --mode <mode> [--config.group.key=value ...]
    python main.py ...   # the same, from a checkout

`--config` takes a config file's path, or the name of a shipped one (`tiny`, `digits`,
`released/imagenet64`, `ablations/classifier_scale`, ...), so an installed gdiff runs from any
directory. Modes: pipeline (the embedded digits job end to end; the default), train,
train_classifier, sample, sweep, evaluate, convert, nll.

A flag string of the reference's scripts drives a run too: `--reference_flags="$MODEL_FLAGS
$DIFFUSION_FLAGS $TRAIN_FLAGS" --reference_script=image_train` writes those flags into the loaded
config (through `gdiff.compat.flags.TO_CONFIG`, where that script puts them) before the mode runs,
and logs what means something else in gdiff or nothing at all.

A missing config file (or one without a `get_config` returning a ConfigDict) or an unknown config
key ends in a one-line message naming it (and the closest known key), not a traceback; so does
every `gdiff.errors.GdiffError` a mode raises (a checkpoint that cannot be restored, a config that
does not match it, a locked workdir, a malformed input file), and, wherever it happens, a
permission error (a read-only directory) or a full disk, naming the path. Any other exception is
a bug and keeps its traceback.
"""

import difflib
import importlib.util
import os
import pathlib
import re
import sys

# TensorFlow (input pipeline only) must never grab accelerator memory that JAX needs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import configs  # noqa: E402
from gdiff import distributed, errors  # noqa: E402
from gdiff.compat import flags as ref_flags  # noqa: E402
from gdiff.evaluation import evaluator  # noqa: E402
from gdiff.jobs import convert, digits, nll, sample, sweep  # noqa: E402
from gdiff.jobs import train as train_job  # noqa: E402

CONFIG_DIR = pathlib.Path(configs.__file__).parent
DEFAULT_CONFIG = "digits"
# mode -> fn(config, workdir). Importing these builds no arrays, so jax.distributed can still be
# initialised in main() before the first computation.
MODES = {
    "pipeline": digits.run,
    "train": train_job.train,
    "train_classifier": train_job.train_classifier,
    "sample": sample.run,
    "sweep": sweep.run,
    "evaluate": evaluator.run,
    "convert": convert.run,
    "nll": nll.run,
}


class UsageError(Exception):
    """A command-line mistake, reported in one line."""


def shipped_configs() -> list[str]:
    """Names of the config files shipped with gdiff (`released/imagenet64`, ...)."""
    names = []
    for path in sorted(CONFIG_DIR.rglob("*.py")):
        name = path.relative_to(CONFIG_DIR).with_suffix("").as_posix()
        if not path.name.startswith("_") and name != "common":
            names.append(name)
    return names


def resolve_config(value: str) -> str:
    """A config argument -> the path of the file: an existing path, else a shipped config's name
    (with or without `.py`, with or without a leading `configs/`)."""
    file, colon, arg = value.partition(":")
    if os.path.isfile(file):
        return value
    name = file.removeprefix("configs/").removesuffix(".py")
    path = CONFIG_DIR / f"{name}.py"
    if name and path.is_file():
        return f"{path}{colon}{arg}"
    close = difflib.get_close_matches(name, shipped_configs(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UsageError(
        f"config file {value!r} not found: give a path or a shipped config name{hint} "
        f"(shipped: {', '.join(shipped_configs())})"
    )


def _split_arg(argv: list[str], i: int) -> tuple[str, str | None, int]:
    """The flag at argv[i] -> (name, value or None, index of the next argument)."""
    name, eq, value = argv[i].lstrip("-").partition("=")
    if eq:
        return name, value, i + 1
    if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        return name, argv[i + 1], i + 2
    return name, None, i + 1


def check_overrides(config, argv: list[str]) -> None:
    """Raises UsageError for a `--config.<key>` override whose key the config does not have."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config.") :].split("=", 1)[0].split(".")
        node, seen = config, []
        for key in path:
            if not hasattr(node, "keys") or key not in node:
                known = list(node.keys()) if hasattr(node, "keys") else []
                close = difflib.get_close_matches(key, known, n=1)
                where = f"group {'.'.join(seen)!r}" if seen else "the config"
                hint = f"; did you mean {'.'.join([*seen, close[0]])!r}?" if close else ""
                raise UsageError(
                    f"unknown config key {'.'.join(path)!r}: {where} has no {key!r}{hint}"
                )
            node, seen = node[key], [*seen, key]


def prepare_argv(argv: list[str]) -> list[str]:
    """Resolves `--config` (path or shipped name; the default when absent) and checks every
    `--config.<key>` override against the config, before absl parses anything."""
    argv = list(argv)
    index = next(
        (i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")), None
    )
    if index is None:
        argv[1:1] = [f"--config={resolve_config(DEFAULT_CONFIG)}"]
    else:
        _, value, nxt = _split_arg(argv, index)
        if value is None:
            raise UsageError("--config needs a value: a config file path or a shipped config name")
        argv[index:nxt] = [f"--config={resolve_config(value)}"]
    value = next(a for a in argv if a.startswith("--config=")).split("=", 1)[1]
    check_overrides(load_config(value), argv)
    return argv


def load_config(value: str):
    """The config a `--config=<path>[:<arg>]` value names (what config_flags will load).

    Raises:
      UsageError: the file is not a Python file, has no `get_config`, or its `get_config` returns
        something other than an `ml_collections.ConfigDict`.
    """
    path, _, arg = value.partition(":")
    spec = importlib.util.spec_from_file_location("_gdiff_checked_config", path)
    if spec is None or spec.loader is None:
        raise UsageError(
            f"config file {path} is not a Python file: a config is a .py file defining "
            "get_config() -> ml_collections.ConfigDict"
        )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise UsageError(
            f"config file {path} defines no get_config(): a config file defines "
            "get_config() -> ml_collections.ConfigDict (see configs/tiny.py)"
        )
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise UsageError(
            f"config file {path}: get_config() returned a value of type "
            f"{type(config).__name__}, not an ml_collections.ConfigDict (see configs/tiny.py)"
        )
    return config


_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config: a file path or a shipped name (default: digits).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/digits", "Where checkpoints, logs, samples go.")
_MODE = flags.DEFINE_enum("mode", "pipeline", list(MODES), "What to run.")
_REFERENCE_FLAGS = flags.DEFINE_string(
    "reference_flags",
    None,
    'Flags of the reference\'s scripts, pasted (e.g. "$MODEL_FLAGS $TRAIN_FLAGS"), written into '
    "the config before the mode runs; needs --reference_script.",
)
_REFERENCE_SCRIPT = flags.DEFINE_enum(
    "reference_script",
    None,
    list(ref_flags.SCRIPTS),
    "The reference script the --reference_flags are for: it decides which flags exist and where "
    "some go (batch_size is train.batch_size for image_train, sample.batch_size for image_sample).",
)
_REFERENCE_DEFAULTS = flags.DEFINE_bool(
    "reference_defaults",
    False,
    "Start from --reference_script's own defaults for every flag not given (the reference's run "
    "exactly) instead of the config's values.",
)


def _hide_accelerators_from_tensorflow() -> None:
    # The one deferred import: TensorFlow is only the input pipeline's, and heavy.
    try:
        import tensorflow as tf
    except ImportError:
        return
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")


def apply_reference_flags(config, flag_string: str | None, script: str | None, defaults: bool):
    """Writes a pasted reference flag string into `config` and logs the notes on it.

    Raises:
      UsageError: no script named, an unknown flag (with the closest known one) or a bad value.
    """
    if flag_string is None and not defaults:
        return
    if script is None:
        raise UsageError(
            f"--reference_flags needs --reference_script (one of {', '.join(ref_flags.SCRIPTS)})"
        )
    try:
        notes = ref_flags.write_flags(config, flag_string or "", script, with_defaults=defaults)
    except (TypeError, ValueError, KeyError) as e:
        raise UsageError(f"--reference_flags: {e}") from e
    if not defaults:
        logging.info("%s flags not given keep the config's values", script)
    for line in notes:
        logging.warning("reference flag %s", line)


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _MODE.value == "pipeline" and not flags.FLAGS["verbosity"].present:
        # The newcomer's job prints its own stage lines and progress bars; library INFO lines
        # (orbax writes ~300 per run) would bury them. --verbosity=0 brings them back.
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    try:
        apply_reference_flags(
            config, _REFERENCE_FLAGS.value, _REFERENCE_SCRIPT.value, _REFERENCE_DEFAULTS.value
        )
    except UsageError as e:
        sys.exit(f"gdiff: {e}")
    try:
        distributed.maybe_initialize(
            config.distributed,
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    except errors.GdiffError as e:
        # A launch without a process count or id: one line naming the variable to set.
        _exit_with(str(e), e.exit_status)
    logging.info(
        "process %d/%d, %d local / %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.default_backend(),
    )
    mode, workdir = _MODE.value, _WORKDIR.value
    if mode in ("train", "train_classifier", "pipeline", "nll"):
        _hide_accelerators_from_tensorflow()
    try:
        result = MODES[mode](config, workdir)
        if isinstance(result, dict) and result.get("stopped_early"):
            raise errors.StoppedError(
                f"{mode} stopped on a request after saving step {int(result['state'].step)}; "
                "rerun the same command to resume"
            )
    except errors.GdiffError as e:
        # A complete message (what, where, what to do): the traceback would only bury it.
        _exit_with(str(e), e.exit_status)
    except PermissionError as e:
        _exit_with(_permission_message(e, workdir), 1)
    except Exception as e:
        if not errors.is_disk_full(e):
            raise  # a bug: its traceback is the report
        _exit_with(_disk_full_message(e, workdir), 1)


def _exit_with(message: str, status: int) -> None:
    logging.error("%s", message)
    print(f"gdiff: {message}", file=sys.stderr)
    sys.exit(status)


def _named_path(path) -> str:
    """The path a failed write meant: an atomic write's temporary sibling
    (`.<name>.tmp-<hex>`, gdiff.atomic) names the file it was to replace."""
    path = os.fspath(path)
    head, name = os.path.split(path)
    match = re.fullmatch(r"\.(.+)\.tmp-[0-9a-f]{32}", name)
    return os.path.join(head, match.group(1)) if match else path


def _permission_message(e: PermissionError, workdir: str) -> str:
    """A permission error anywhere in a mode: which path, and what to do."""
    if e.filename is None:
        return (
            f"permission denied: {e.strerror or e}; check that --workdir={workdir} and the "
            "config's output paths are writable by this user"
        )
    path = _named_path(e.filename)
    if os.path.isfile(path) and not os.access(path, os.R_OK):
        return f"cannot read {path}: permission denied; make it readable by this user"
    if os.path.isfile(path) and not os.access(path, os.W_OK):
        return (
            f"cannot write {path}: permission denied; the file is read-only for this user: make "
            "it writable, or give a writable --workdir (or output path)"
        )
    parent = os.path.dirname(os.path.abspath(path)) if not os.path.isdir(path) else path
    return (
        f"cannot write {path}: permission denied; the directory {parent} is read-only for this "
        "user: make it writable, or give a writable --workdir (or output path)"
    )


def _disk_full_message(e: BaseException, workdir: str) -> str:
    """A full disk anywhere in a mode: which path (where the failed write says), what to do."""
    path, seen = None, set()
    while e is not None and id(e) not in seen and path is None:
        seen.add(id(e))
        if isinstance(e, OSError) and e.filename is not None:
            path = _named_path(e.filename)
        e = e.__cause__ or e.__context__
    where = f"writing {path}" if path else f"writing under --workdir={workdir}"
    return (
        f"no space left on device (or disk quota exceeded) {where}: free space on that disk or "
        "give a --workdir on another one, then rerun the same command"
    )


def main(argv: list[str] | None = None) -> None:
    """The `gdiff` command (and `python main.py`)."""
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("--help", "-h", "-?") for a in argv[1:]):
        print(__doc__)
        print(flags.FLAGS.module_help(__name__))
        print("\nShipped configs: " + ", ".join(shipped_configs()))
        print("All flags (absl's included): --helpfull")
        return
    if "--helpfull" not in argv:
        try:
            argv = prepare_argv(argv)
        except UsageError as e:
            sys.exit(f"gdiff: {e}")
    app.run(_main, argv=argv)
