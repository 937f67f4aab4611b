"""Finding a checkpoint on disk and loading its parameters.

`locate` is the one place that finds a checkpoint on disk (a path given by the user, a step folder,
or a workdir); `load_params`, sampling, the digits pipeline and resuming training all go through it.
Workdir conventions (what `locate(workdir, kind)` looks for, in order; `WORKDIR_LAYOUT` below is
their one declaration, which the trainers and `--mode=convert` write to):
  kind "model":      `<workdir>/checkpoints`, `<workdir>/model_params`
  kind "classifier": `<workdir>/classifier_checkpoints`, `<workdir>/classifier_params`

`locate` also recognises a reference (PyTorch) training run, the files guided-diffusion's
`TrainLoop.save()` writes (`model<step>.pt`, `ema_<rate>_<step>.pt`, `opt<step>.pt`), so that
`train.resume_checkpoint` can name one (gdiff/compat/reference_run.py imports it).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from gdiff import errors
from gdiff.checkpoints import fingerprints, store

# The model file of a reference training run: `model{step:06d}.pt` (TrainLoop.save()).
REFERENCE_MODEL_FILE = re.compile(r"^model(\d+)\.pt$")
# Where a workdir keeps each kind's checkpoints, in the order `locate` tries them: the training
# checkpoints (`training_dir`, written by the trainers), then a parameter checkpoint (`params_dir`,
# written by --mode=convert). The only place these folder names are declared.
WORKDIR_LAYOUT = {
    "model": ("checkpoints", "model_params"),
    "classifier": ("classifier_checkpoints", "classifier_params"),
}


def training_dir(kind: str) -> str:
    """The workdir folder a `kind` ("model" or "classifier") training run checkpoints to."""
    return WORKDIR_LAYOUT[kind][0]


def params_dir(kind: str) -> str:
    """The workdir folder of a `kind` ("model" or "classifier") parameter checkpoint (what
    --mode=convert writes)."""
    return WORKDIR_LAYOUT[kind][1]


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a checkpoint is, as `locate` found it."""

    # a save_params directory, an orbax CheckpointManager directory, or the folder of a reference
    # training run's files
    path: pathlib.Path
    # "params" (save_params), "training" (CheckpointManager steps) or "reference_run"
    # (model<step>.pt + ema_<rate>_<step>.pt + opt<step>.pt of guided-diffusion's TrainLoop)
    format: str
    # "training": the step to restore (the step folder given, else the newest finished one);
    # "reference_run": the model file's step (the one given, else the newest); None for "params".
    step: int | None
    # Whether `step` is the newest one found (no step folder was named): a live trainer may
    # rotate it away, and loading then takes the new newest step (`load_pinned`). Not compared:
    # the same step is the same checkpoint however it was found.
    newest: bool = dataclasses.field(default=False, compare=False)


def _checkpoint_at(path: pathlib.Path) -> Location | None:
    """`path` itself as a checkpoint (params dir, training dir, or one step folder), else None."""
    if (path / store.METADATA_FILE).exists():
        return Location(path, "params", None)
    steps = store.finished_steps(path)
    if steps:
        return Location(path, "training", steps[-1], newest=True)
    if path.name.isdigit() and store.finished_steps(path.parent):
        return Location(path.parent, "training", int(path.name))
    return _reference_run_at(path)


def _reference_run_at(path: pathlib.Path) -> Location | None:
    """A reference run's `model<step>.pt` file, or a folder holding some (the newest step)."""
    match = REFERENCE_MODEL_FILE.match(path.name)
    if path.is_file() and match:
        return Location(path.parent, "reference_run", int(match.group(1)))
    if not path.is_dir():
        return None
    steps = [int(m.group(1)) for p in path.iterdir() if (m := REFERENCE_MODEL_FILE.match(p.name))]
    return Location(path, "reference_run", max(steps)) if steps else None


def _unfinished(path: pathlib.Path) -> str:
    """A note for the error message when `path` is a training directory with no finished step."""
    if (path / store.CONFIG_FILE).exists():
        return f" ({path} is a training checkpoint directory with no finished step yet)"
    return ""


def locate(path: str | os.PathLike, kind: str | None = None) -> Location:
    """Finds the checkpoint that `path` names.

    Args:
      path: a save_params dir, a training checkpoint dir, one step folder of it, a reference
        training run (a `model<step>.pt` file or its folder), or (when kind is "model" or
        "classifier") a workdir holding one of WORKDIR_LAYOUT[kind], tried in order.
      kind: None when `path` itself must be a checkpoint; "model" or "classifier" to also look
        inside a workdir.

    Raises:
      errors.MissingInputError (a FileNotFoundError) naming what was looked for: the path is
      missing, holds no checkpoint, or is a training directory with no finished step.
    """
    if kind is not None and kind not in WORKDIR_LAYOUT:
        raise ValueError(f"kind must be one of {sorted(WORKDIR_LAYOUT)}; got {kind!r}")
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise errors.MissingInputError(f"checkpoint path {path} does not exist")
    found = _checkpoint_at(path)
    if found is not None:
        return found
    if kind is None:
        raise errors.MissingInputError(
            f"no checkpoint at {path}: expected a parameter checkpoint "
            f"(with {store.METADATA_FILE}), a training checkpoint directory (digit-named step "
            f"folders) or a reference training run (model<step>.pt){_unfinished(path)}"
        )
    candidates = [path / name for name in WORKDIR_LAYOUT[kind]]
    for candidate in candidates:
        found = _checkpoint_at(candidate)
        if found is not None:
            return found
    raise errors.MissingInputError(
        f"no {kind} checkpoint at {path}: expected a parameter checkpoint "
        f"(with {store.METADATA_FILE}), a training checkpoint directory, or a workdir containing "
        f"one of {', '.join(WORKDIR_LAYOUT[kind])}" + "".join(_unfinished(c) for c in candidates)
    )


def step_folder(path: str | os.PathLike, step: int, kind: str = "model") -> pathlib.Path:
    """The folder of training step `step` of the run `path` names (a workdir, its training
    checkpoint directory, or any step folder of it): what `sample.checkpoint_steps` samples.

    Raises:
      errors.MissingInputError: no checkpoint at `path`, or `step` is not among its finished
        steps (the message lists them).
      errors.InputError: `path` holds parameters, not a training run's steps.
    """
    found = locate(path, kind)
    if found.format != "training":
        raise errors.InputError(
            f"{path} holds a {'parameter checkpoint' if found.format == 'params' else found.format}"
            f" ({found.path}), not the steps of a training run: step {step} can only be taken "
            "from a training checkpoint directory"
        )
    steps = store.finished_steps(found.path)
    if step not in steps:
        raise errors.MissingInputError(
            f"step {step} is not a finished checkpoint of {found.path} (it has "
            f"{', '.join(map(str, steps))}): train.max_to_keep keeps only the newest steps; "
            "train.keep_every keeps every Nth step beyond them"
        )
    return found.path / str(step)


def load_params(
    path: str | os.PathLike | Location,
    *,
    ema_rate: str | float | None = None,
    kind: str = "model",
) -> Any:
    """Loads inference parameters from any gdiff checkpoint.

    Args:
      path: a `save_params` directory, a training checkpoint directory (newest step is used), one
        step folder of it, or a workdir (see the module docstring for where it looks); or what
        `locate` returned for one.
      ema_rate: which EMA copy of a training checkpoint to return (e.g. "0.9999"); default the
        slowest (largest) rate stored, the one the reference samples from; the raw parameters when
        the checkpoint has no EMA.
      kind: "model" or "classifier", for workdir look-up.

    Returns:
      The parameter pytree (nested dicts of arrays), ready for `module.apply({"params": p}, ...)`.
    """
    return load_pinned(path, ema_rate=ema_rate, kind=kind)[0]


def load_pinned(
    path: str | os.PathLike | Location,
    *,
    ema_rate: str | float | None = None,
    kind: str = "model",
) -> tuple[Any, dict]:
    """`load_params`, plus what exactly was loaded: (params, pin).

    pin = {"path", "format", "step", "ema_rate", "sha256"}: the checkpoint found, its step (None
    for a parameter checkpoint), the EMA copy taken (None: the raw parameters) and
    `fingerprints.params_fingerprint(params)`. A run that records the pin (a sampling manifest)
    can tell the same weights from others at the same path.

    A training directory's newest step may be rotated away (train.max_to_keep) by a live trainer
    while it is read: the new newest step is then read instead, once.

    Raises:
      errors.MissingInputError: no checkpoint at `path`, or its step was deleted while it was
        read (a live trainer's rotation).
      errors.UnknownKeyError: `ema_rate` is not among the EMA copies stored.
    """
    found = path if isinstance(path, Location) else locate(path, kind)
    if found.format == "reference_run":
        raise errors.InputError(
            f"{found.path} holds a reference (PyTorch) training run (model{found.step:06d}.pt): "
            "convert its model or EMA file with --mode=convert (config.torch_checkpoint) to sample "
            "from it, or continue training it with train.resume_checkpoint"
        )
    key = None
    if found.format == "params":
        item = found.path / store.PARAMS_ITEM
        target = store.host_target(ocp.StandardCheckpointHandler().metadata(item))
        params = ocp.StandardCheckpointer().restore(item, target)
    else:
        state, found = _restore_training(found)
        ema = state.get("ema_params") or {}
        params = state["params"]
        if ema:
            key = ema_key(ema, ema_rate, where=f"{found.path} step {found.step}")
            params = ema[key]
    pin = {
        "path": str(found.path),
        "format": found.format,
        "step": found.step,
        "ema_rate": key,
        "sha256": fingerprints.params_fingerprint(params),
    }
    return params, pin


def _restore_training(found: Location) -> tuple[Any, Location]:
    """(the raw state of `found`'s step, the location actually read).

    A live trainer deletes its oldest step after saving a new one (train.max_to_keep), so the
    step being read may vanish under the reader: the newest step (no step folder was named) is
    then read again from the new newest, once; a named step, or a second loss, is reported.
    """
    retried = False
    while True:
        manager = store.CheckpointManager(found.path)
        try:
            return manager.restore_raw(found.step), found
        except (errors.CheckpointError, FileNotFoundError):
            if (found.path / str(found.step)).is_dir():
                raise  # damaged, not rotated away: restore_raw's message says which file
        finally:
            manager.close()
        gone, steps = found.step, store.finished_steps(found.path)
        if not (found.newest and steps and not retried):
            raise errors.MissingInputError(
                f"step {gone} of {found.path} was deleted while it was being read: a live "
                "trainer rotated it away (train.max_to_keep); rerun to read the newest step, or "
                "set sample.model_checkpoint (sample.classifier_checkpoint for a classifier) to a "
                "copy of one step folder, kept under its step number, that the trainer cannot "
                "delete"
            )
        logging.warning(
            "%s: step %d was deleted while it was being read (a live trainer rotated it away); "
            "reading step %d, now the newest",
            found.path,
            gone,
            steps[-1],
        )
        found, retried = dataclasses.replace(found, step=steps[-1]), True


def ema_key(rates, ema_rate: str | float | None = None, *, where: str = "the checkpoint") -> str:
    """Which stored EMA copy to sample from: the one equal to `ema_rate`, else the slowest
    (largest) rate, the one the reference samples from.

    Args:
      rates: the stored EMA rates (strings, e.g. the keys of `TrainState.ema_params`); not empty.
      ema_rate: the requested rate, or None / "" for the default.
      where: what holds them, for the error message.

    Raises:
      errors.UnknownKeyError (a ConfigError and a KeyError): `ema_rate` is not among `rates`.
    """
    rates = list(rates)
    if ema_rate in (None, ""):
        return max(rates, key=float)
    try:
        wanted = float(ema_rate)
    except (TypeError, ValueError):
        wanted = None
    matches = [k for k in rates if wanted is not None and np.isclose(float(k), wanted)]
    if not matches:
        raise errors.UnknownKeyError(
            f"{where} has EMA rates {sorted(rates)}, not {ema_rate}: set sample.ema_rate to one "
            "of them, or leave it empty for the slowest"
        )
    return matches[0]
