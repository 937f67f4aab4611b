"""Writing and reading checkpoints: orbax behind one small module.

Two kinds live on disk:

* Training checkpoints (`CheckpointManager`): an orbax `CheckpointManager` directory (one
  sub-folder per step, written atomically by orbax: a killed save leaves the previous step usable)
  plus `gdiff_config.json`, the fingerprint of the configuration that wrote them. A run whose
  configuration differs refuses to resume from it instead of silently loading mismatched weights.
  A restore is verified first; a resumed run falls back to the newest intact step, setting the
  broken ones aside.
* Parameter checkpoints (`save_params`): inference weights only, e.g. a converted OpenAI checkpoint.
  Layout `<dir>/params` (orbax) + `<dir>/gdiff_metadata.json`, built in a temporary folder and
  renamed into place, so a finished one is never half-overwritten.

Finding one on disk (a path, a step folder or a workdir) and loading its parameters is
gdiff/checkpoints/locate.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import sys
import uuid
from collections.abc import Collection, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from gdiff import atomic, distributed, errors, treediff
from gdiff.checkpoints import fingerprints

CONFIG_FILE = "gdiff_config.json"
# Settings a resumed run may change (the learning-rate schedule): recorded to report the change.
SETTINGS_FILE = "gdiff_settings.json"
METADATA_FILE = "gdiff_metadata.json"
PARAMS_ITEM = "params"


def _jsonable(tree: Any) -> Any:
    """Config dicts -> plain JSON values (tuples become lists) so fingerprints compare stably."""
    return json.loads(json.dumps(tree, sort_keys=True, default=str))


def _without(tree: Any, keys: Collection[str]) -> Any:
    """`tree` (JSON values) without the dict entries named in `keys`, at any depth."""
    if isinstance(tree, dict):
        return {k: _without(v, keys) for k, v in tree.items() if k not in keys}
    return tree


class CheckpointManager:
    """Periodic, atomic, resumable training checkpoints.

    Args:
      directory: where the step folders go (created if missing).
      max_to_keep: how many recent steps survive.
      keep_every: > 0: also keep every step that is a multiple of it, beyond max_to_keep (a
        series of checkpoints at fixed iterations, for ablations over training); 0: none.
      config_fingerprint: a JSON-able dict describing what the checkpoint holds (model, diffusion,
        optimiser shapes...). Opening a directory written under a different fingerprint raises
        ConfigMismatchError (a ValueError) naming the differing keys, before anything is written.
      ignore_keys: key names dropped, at any depth, from a stored fingerprint before comparing
        (keys that older versions recorded and this one leaves out).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        keep_every: int = 0,
        config_fingerprint: Mapping[str, Any] | None = None,
        ignore_keys: Collection[str] = (),
    ):
        self.directory = pathlib.Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        if config_fingerprint is not None:
            self._check_fingerprint(_jsonable(dict(config_fingerprint)), ignore_keys)
        if keep_every < 0:
            raise errors.ConfigError(
                f"train.keep_every={keep_every} must be >= 0 (0: keep only the newest "
                "train.max_to_keep steps)"
            )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            # orbax never deletes a step that is a multiple of keep_period.
            keep_period=keep_every or None,
            create=True,
            enable_async_checkpointing=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._writing: int | None = None  # the step of the newest save started

    def _check_fingerprint(self, fingerprint: dict, ignore: Collection[str]) -> None:
        path = self.directory / CONFIG_FILE
        if path.exists():
            stored = json.loads(path.read_text())
            diffs = [
                f"{k} (only in this run)"
                if a is treediff.MISSING
                else f"{k} (only in checkpoint)"
                if b is treediff.MISSING
                else f"{k}: checkpoint {a!r} vs this run {b!r}"
                for k, a, b in treediff.changed_keys(_without(stored, ignore), fingerprint)
            ]
            if diffs:
                raise errors.ConfigMismatchError(
                    f"{self.directory} holds checkpoints of another configuration; refusing to "
                    "resume from or overwrite them. Use a fresh workdir or the original config. "
                    "Differences: " + "; ".join(diffs[:20])
                )
        elif jax.process_index() == 0:
            atomic.write_text(path, json.dumps(fingerprint, indent=1, sort_keys=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Starts an asynchronous, atomic save of `state` at `step`; returns whether it saved.

        Raises:
          errors.DiskFullError: this save, or the previous one still being written, ran out of
            space (the newest finished step stays intact).
        """
        with self._reporting_disk_full(step):
            saved = self._manager.save(int(step), args=ocp.args.StandardSave(state), force=force)
        if saved:
            self._writing = int(step)
        return saved

    def note_settings(self, settings: Mapping[str, Any]) -> list[str]:
        """Records settings that may change between invocations (the learning-rate schedule)
        and returns how they changed since the last one ("key: old -> new"), empty on the
        first. Unlike the fingerprint, a change is allowed; the caller reports it."""
        path = self.directory / SETTINGS_FILE
        settings = _jsonable(dict(settings))
        old = json.loads(path.read_text()) if path.exists() else None
        changes = [] if old is None else treediff.changed_keys(old, settings)
        if jax.process_index() == 0 and old != settings:
            atomic.write_text(path, json.dumps(settings, indent=1, sort_keys=True))
        return [f"{k}: {a!r} -> {b!r}" for k, a, b in changes]

    @contextlib.contextmanager
    def _reporting_disk_full(self, step: int | None):
        try:
            yield
        except Exception as e:
            if not errors.is_disk_full(e):
                raise
            step = self._writing if step is None else step
            newest = [s for s in finished_steps(self.directory) if s != step]
            resume = f"step {newest[-1]}" if newest else "the start"
            raise errors.DiskFullError(
                f"disk full while saving step {step} to {self.directory}: free space (or lower "
                f"train.max_to_keep) and rerun; it resumes from {resume}"
            ) from e

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores one step (default: the newest) into the structure, dtypes and shardings of
        `abstract_state`, verified first: no fallback to another step.

        `abstract_state` is typically `jax.eval_shape(init_fn)` with shardings attached, so the
        restored arrays are born on the right devices.

        Raises:
          FileNotFoundError: the directory has no finished step.
          errors.ConfigMismatchError: the step holds another state structure (first differing key).
          errors.CheckpointError: the step's files cannot be read (which file, why).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        state, problem = self._try_restore(int(step), abstract_state)
        if problem is not None:
            raise errors.CheckpointError(
                f"cannot restore step {step} of {self.directory}: {problem}"
            )
        return state

    def restore_newest_intact(self, abstract_state: Any) -> tuple[Any, int]:
        """Restores the newest step that restores intact; returns (state, step).

        A step that fails (empty folder, missing or unreadable metadata, damaged array files) is
        reported in one line and renamed `unrestorable_step_<n>` (kept for inspection, out of the
        way of the step the resumed run will save next); the next older step is tried. A step
        that holds a different state structure stops the search with ConfigMismatchError: that
        is a config change, never a reason to go back to an older step.

        Raises:
          FileNotFoundError: the directory has no finished step.
          errors.CheckpointError: no step restores (each step's reason in the message).
        """
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        failed = []
        for step in steps:
            state, problem = self._try_restore(step, abstract_state)
            if problem is None:
                if failed:
                    logging.warning(
                        "%s: resuming from step %d, the newest intact one (%s set aside)",
                        self.directory,
                        step,
                        ", ".join(f"step {s}" for s, _ in failed),
                    )
                return state, step
            logging.warning("%s: step %d cannot be restored: %s", self.directory, step, problem)
            failed.append((step, problem))
            self._set_aside(step)
        raise errors.CheckpointError(
            f"no step of {self.directory} can be restored: "
            + "; ".join(f"step {s}: {p}" for s, p in failed)
        )

    def _try_restore(self, step: int, abstract_state: Any) -> tuple[Any, str | None]:
        """(state, None), or (None, why step `step` cannot be restored, in one line)."""
        problem = _step_problem(self.directory / str(step), abstract_state)
        if problem is not None:
            return None, problem
        _silence_stray_read_callbacks()
        try:
            args = ocp.args.StandardRestore(abstract_state)
            return self._manager.restore(step, args=args), None
        except Exception as e:  # orbax/TensorStore raise many types for damaged files
            return None, _describe_restore_error(e)

    def _set_aside(self, step: int) -> None:
        """Renames a step folder that cannot be restored so the resumed run can save that step
        again; nothing is deleted."""
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst = self.directory / f"unrestorable_step_{step}"
            while dst.exists():
                dst = dst.with_name(f"{dst.name}_{uuid.uuid4().hex[:6]}")
            os.replace(src, dst)
        distributed.barrier(f"gdiff_set_aside_{step}")
        self._manager.reload()

    def restore_raw(self, step: int | None = None) -> Any:
        """Restores without a target: nested dicts of arrays, as saved."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        problem = _step_problem(self.directory / str(step), None)
        if problem is None:
            _silence_stray_read_callbacks()
            try:
                target = host_target(
                    ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / _ITEM)
                )
                return self._manager.restore(int(step), args=ocp.args.StandardRestore(target))
            except Exception as e:  # as in _try_restore
                problem = _describe_restore_error(e)
        older = [s for s in self.all_steps() if s < int(step)]
        hint = f"; the next older step is {self.directory / str(older[-1])}" if older else ""
        raise errors.CheckpointError(
            f"cannot restore step {step} of {self.directory}: {problem}{hint}"
        )

    def wait_until_finished(self) -> None:
        with self._reporting_disk_full(None):
            self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait_until_finished()
        finally:
            self._manager.close()


# The item folder orbax's CheckpointManager writes a StandardSave under, inside each step folder.
_ITEM = "default"
# How a TensorStore error names the array it failed on: "path": "params.block.kernel/" (quoted
# and escaped in several ways); absolute paths (the directory) start with "/" and are skipped.
_ARRAY_IN_ERROR = re.compile(r"path[^\w/]+([A-Za-z_][\w.\-]*)/")


def host_target(metadata: Any) -> Any:
    """A restore target for a saved tree (its orbax tree metadata): every array as a numpy array.

    Without a target orbax puts each array on the devices that saved it, which the other
    processes of a multi-host run do not have ("Device cpu:0 was not found in
    jax.local_devices()"); and an array committed to one device cannot be put on a mesh that
    spans hosts (JAX refuses the cross-host transfer). Host arrays can be put on any mesh by
    every process (sampling, bits/dim: `jax.device_put(params, replicated)`).
    """

    def leaf(m):
        if getattr(m, "shape", None) is None or getattr(m, "dtype", None) is None:
            return m
        # orbax restores as the target's type; a broadcast zero is a numpy array of the saved
        # shape and dtype that allocates nothing (a ShapeDtypeStruct would give jax arrays).
        return np.broadcast_to(np.zeros((), m.dtype), m.shape)

    return jax.tree.map(leaf, metadata)


def _step_problem(step_dir: pathlib.Path, abstract_state: Any) -> str | None:
    """Why `step_dir` cannot be restored, judged from its metadata without reading arrays; None
    when it looks intact.

    Raises:
      errors.ConfigMismatchError: the metadata is readable and describes another structure than
        `abstract_state` (skipped when that is None).
    """
    item = step_dir / _ITEM
    if not step_dir.is_dir() or not any(step_dir.iterdir()):
        return "the step folder is empty"
    if not item.is_dir():
        return f"{item} is missing"
    if not (item / "_METADATA").is_file():
        return f"{item / '_METADATA'} is missing"
    try:
        # The handler reads the item's tree metadata only (a Checkpointer would also look for
        # step metadata inside the item folder and log its absence).
        metadata = ocp.StandardCheckpointHandler().metadata(item)
    except Exception as e:  # damaged metadata or index files fail in many ways
        return f"the metadata of {item} cannot be read ({_first_line(e)})"
    if metadata is None:
        return f"the metadata of {item} cannot be read"
    if abstract_state is not None:
        diff = fingerprints.first_difference(
            fingerprints.tree_signature(metadata), fingerprints.tree_signature(abstract_state)
        )
        if diff is not None:
            raise errors.ConfigMismatchError(
                f"this config does not match the checkpoint {step_dir} (first differing key: "
                f"{diff}); use the config it was trained with, or a fresh workdir"
            )
    return None


def _describe_restore_error(exc: Exception) -> str:
    """One line for an orbax/TensorStore restore failure: the array it failed on and the first
    line of the message (their messages run to hundreds of lines of JSON specs)."""
    arrays = _ARRAY_IN_ERROR.findall(str(exc))
    where = f"array {arrays[0]} is damaged or missing" if arrays else "its files are damaged"
    return f"{where} ({_first_line(exc)})"


def _silence_stray_read_callbacks() -> None:
    """Drops the "Event loop is closed" errors of a failed restore's leftover reads.

    When one array of a step cannot be read, orbax's restore raises and closes its asyncio loop
    while TensorStore still completes the step's other reads; their completion callbacks then
    fail on the closed loop and each prints a traceback (dozens of lines around the one-line
    report), some while the restore is still failing. So before the first restore this process
    attempts, sys.excepthook and sys.unraisablehook learn to drop exactly that error; every other
    exception reaches the previous hooks.
    """
    if getattr(sys.excepthook, "_gdiff_drops_closed_loop", False):
        return

    def closed_loop(exc) -> bool:
        return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"

    previous_except, previous_unraisable = sys.excepthook, sys.unraisablehook

    def except_hook(exc_type, exc, tb):
        if not closed_loop(exc):
            previous_except(exc_type, exc, tb)

    def unraisable_hook(unraisable):
        if not closed_loop(unraisable.exc_value):
            previous_unraisable(unraisable)

    except_hook._gdiff_drops_closed_loop = True
    sys.excepthook, sys.unraisablehook = except_hook, unraisable_hook


def _first_line(exc: BaseException) -> str:
    """`Type: first line of the message`, cut before the spec dumps TensorStore appends."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Traceback")]
    first = lines[0].split(" See full")[0][:160] if lines else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


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
        raise errors.OutputExistsError(
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


def finished_steps(directory: pathlib.Path) -> list[int]:
    """The steps of an orbax checkpoint directory, ascending. Orbax writes a step under a
    temporary name and renames it to the bare number when it is complete, so only digit-named
    folders count."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())
