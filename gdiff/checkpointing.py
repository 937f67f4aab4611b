"""Checkpoints: orbax behind one small module.

Two kinds live on disk:

* Training checkpoints: an orbax `CheckpointManager` directory (one sub-folder per step, written
  atomically by orbax: a killed save leaves the previous step usable) plus `gdiff_config.json`, the
  fingerprint of the configuration that wrote them. A run whose configuration differs refuses to
  resume from it instead of silently loading mismatched weights.
* Parameter checkpoints (`save_params`): inference weights only, e.g. a converted OpenAI checkpoint.
  Layout `<dir>/params` (orbax) + `<dir>/gdiff_metadata.json`, built in a temporary folder and
  renamed into place, so a finished one is never half-overwritten.

`locate` also recognises a reference (PyTorch) training run, the files guided-diffusion's
`TrainLoop.save()` writes (`model<step>.pt`, `ema_<rate>_<step>.pt`, `opt<step>.pt`), so that
`train.resume_checkpoint` can name one (gdiff/compat/reference_run.py imports it).

`locate` is the one place that finds a checkpoint on disk (a path given by the user, a step folder,
or a workdir); `load_params`, sampling, the digits pipeline and resuming training all go through it.
Workdir conventions (what `locate(workdir, kind)` looks for, in order):
  kind "model":      `<workdir>/checkpoints`, `<workdir>/model_params`
  kind "classifier": `<workdir>/classifier_checkpoints`, `<workdir>/classifier_params`
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "gdiff_config.json"
METADATA_FILE = "gdiff_metadata.json"
PARAMS_ITEM = "params"
# The model file of a reference training run: `model{step:06d}.pt` (TrainLoop.save()).
REFERENCE_MODEL_FILE = re.compile(r"^model(\d+)\.pt$")
WORKDIR_LAYOUT = {
    "model": ("checkpoints", "model_params"),
    "classifier": ("classifier_checkpoints", "classifier_params"),
}


def _jsonable(tree: Any) -> Any:
    """Config dicts -> plain JSON values (tuples become lists) so fingerprints compare stably."""
    return json.loads(json.dumps(tree, sort_keys=True, default=str))


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                out.append(f"{name} (only in {'checkpoint' if key in a else 'this run'})")
            else:
                out.extend(_diff_keys(a[key], b[key], name))
        return out
    return [] if a == b else [f"{prefix}: checkpoint {a!r} vs this run {b!r}"]


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointManager:
    """Periodic, atomic, resumable training checkpoints.

    Args:
      directory: where the step folders go (created if missing).
      max_to_keep: how many recent steps survive.
      config_fingerprint: a JSON-able dict describing what the checkpoint holds (model, diffusion,
        optimiser shapes...). Opening a directory written under a different fingerprint raises
        ValueError naming the differing keys, before anything is written.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        config_fingerprint: Mapping[str, Any] | None = None,
    ):
        self.directory = pathlib.Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        if config_fingerprint is not None:
            self._check_fingerprint(_jsonable(dict(config_fingerprint)))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def _check_fingerprint(self, fingerprint: dict) -> None:
        path = self.directory / CONFIG_FILE
        if path.exists():
            stored = json.loads(path.read_text())
            diffs = _diff_keys(stored, fingerprint)
            if diffs:
                raise ValueError(
                    f"{self.directory} holds checkpoints of another configuration; refusing to "
                    "resume from or overwrite them. Use a fresh workdir or the original config. "
                    "Differences: " + "; ".join(diffs[:20])
                )
        elif jax.process_index() == 0:
            _atomic_write_text(path, json.dumps(fingerprint, indent=1, sort_keys=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Starts an asynchronous, atomic save of `state` at `step`; returns whether it saved."""
        return self._manager.save(int(step), args=ocp.args.StandardSave(state), force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores into the structure, dtypes and shardings of `abstract_state`.

        `abstract_state` is typically `jax.eval_shape(init_fn)` with shardings attached, so the
        restored arrays are born on the right devices.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self._manager.restore(int(step), args=ocp.args.StandardRestore(abstract_state))

    def restore_raw(self, step: int | None = None) -> Any:
        """Restores without a target: nested dicts of arrays, as saved."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self._manager.restore(int(step), args=ocp.args.StandardRestore())

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def save_params(
    directory: str | os.PathLike,
    params: Any,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes inference parameters atomically to `directory`.

    The checkpoint is assembled in a temporary sibling folder and renamed into place; an existing
    finished checkpoint is left untouched unless `overwrite` is set (and even then it is replaced
    only after the new one is complete).
    """
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(
            f"{directory} already exists; refusing to overwrite a finished checkpoint "
            "(pass overwrite=True or choose another directory)"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex}")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / PARAMS_ITEM, params)
    checkpointer.wait_until_finished()
    meta = {"kind": "params", **_jsonable(dict(metadata or {}))}
    if jax.process_index() == 0:
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    return directory


def read_metadata(directory: str | os.PathLike) -> dict:
    """The metadata dict stored by `save_params` (empty for training checkpoints)."""
    path = pathlib.Path(directory) / METADATA_FILE
    return json.loads(path.read_text()) if path.exists() else {}


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


def _finished_steps(directory: pathlib.Path) -> list[int]:
    """The steps of an orbax checkpoint directory, ascending. Orbax writes a step under a
    temporary name and renames it to the bare number when it is complete, so only digit-named
    folders count."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _checkpoint_at(path: pathlib.Path) -> Location | None:
    """`path` itself as a checkpoint (params dir, training dir, or one step folder), else None."""
    if (path / METADATA_FILE).exists():
        return Location(path, "params", None)
    steps = _finished_steps(path)
    if steps:
        return Location(path, "training", steps[-1])
    if path.name.isdigit() and _finished_steps(path.parent):
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
    if (path / CONFIG_FILE).exists():
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
      FileNotFoundError naming what was looked for: the path is missing, holds no checkpoint, or
      is a training directory with no finished step.
    """
    if kind is not None and kind not in WORKDIR_LAYOUT:
        raise ValueError(f"kind must be one of {sorted(WORKDIR_LAYOUT)}; got {kind!r}")
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    found = _checkpoint_at(path)
    if found is not None:
        return found
    if kind is None:
        raise FileNotFoundError(
            f"no checkpoint at {path}: expected a parameter checkpoint (with {METADATA_FILE}), "
            "a training checkpoint directory (digit-named step folders) or a reference training "
            f"run (model<step>.pt){_unfinished(path)}"
        )
    candidates = [path / name for name in WORKDIR_LAYOUT[kind]]
    for candidate in candidates:
        found = _checkpoint_at(candidate)
        if found is not None:
            return found
    raise FileNotFoundError(
        f"no {kind} checkpoint at {path}: expected a parameter checkpoint (with {METADATA_FILE}), "
        f"a training checkpoint directory, or a workdir containing one of "
        f"{', '.join(WORKDIR_LAYOUT[kind])}" + "".join(_unfinished(c) for c in candidates)
    )


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
    found = path if isinstance(path, Location) else locate(path, kind)
    if found.format == "reference_run":
        raise ValueError(
            f"{found.path} holds a reference (PyTorch) training run (model{found.step:06d}.pt): "
            "convert its model or EMA file with --mode=convert (config.torch_checkpoint) to sample "
            "from it, or continue training it with train.resume_checkpoint"
        )
    if found.format == "params":
        return ocp.StandardCheckpointer().restore(found.path / PARAMS_ITEM)
    manager = CheckpointManager(found.path)
    state = manager.restore_raw(found.step)
    manager.close()
    ema = state.get("ema_params") or {}
    if not ema:
        return state["params"]
    key = ema_key(ema, ema_rate, where=f"{found.path} step {found.step}")
    return ema[key]


def ema_key(rates, ema_rate: str | float | None = None, *, where: str = "the checkpoint") -> str:
    """Which stored EMA copy to sample from: the one equal to `ema_rate`, else the slowest
    (largest) rate, the one the reference samples from.

    Args:
      rates: the stored EMA rates (strings, e.g. the keys of `TrainState.ema_params`); not empty.
      ema_rate: the requested rate, or None / "" for the default.
      where: what holds them, for the error message.

    Raises:
      KeyError: `ema_rate` is not among `rates`.
    """
    rates = list(rates)
    if ema_rate in (None, ""):
        return max(rates, key=float)
    matches = [k for k in rates if np.isclose(float(k), float(ema_rate))]
    if not matches:
        raise KeyError(f"{where} has EMA rates {sorted(rates)}, not {ema_rate}")
    return matches[0]
