"""The one resumable, sharded run engine: work items -> shards on disk -> merge -> pinned manifest.

Sampling runs, classifier-scale sweeps and bits/dim runs are the same job shape: a fixed list of
global batches, each one collective program over every device of every host, whose rows each
process writes to its own shard; a killed run resumes from the shards on disk, and at the end
process 0 merges them into the job's outputs. This module does everything that shape needs, once:

    lock the output directory (one writer)
    -> job.pin(): load the weights, return the manifest with their pins
    -> manifest.check_run_manifest (refuse, or move aside, a run made with other settings)
    -> job.finished(): outputs already there (and made under this run)? done; made under
       another run (run.json deleted or edited): refused, or with the job's restart setting the
       directory is moved aside and the run starts afresh
    -> draw: the batches some process lacks a shard of (agreed by all), a progress bar, one shard
       per (part, batch, process) tagged with the run digest, never rewritten
    -> gather + job.merge (process 0), between barriers

A job supplies only what is its own (`Job`): where its output goes and how its batches split
(`Layout`), its manifest and weights, the per-batch computation and the output format. The
engine neither knows nor cares whether a row is an image or a bits/dim term.

Layout of a run's output directory:

    <out>/run.json                          the manifest (gdiff/engine/manifest.py)
    <out>/<part>/shard_<process>_<batch>.npz  one per part, batch and process (one process)
    <out>/<part>/shard_<process>of<N>_<batch>.npz  the same, written by a run of N > 1 processes
    <out>/...                               the job's merged outputs

A batch's rows do not depend on how many processes drew it, so a run stopped under one process
count resumes under another (2 hosts, then 1): a batch is done when all shards of some count are
there, and the merge takes each batch from such a set (`Layout.complete`).

Every file is written to a temporary name and `os.replace`d into place (gdiff/atomic.py), so a
killed run leaves either a complete file or none; a shard that exists is finished, never rewritten:
one that cannot be read (damaged on disk) stops the merge, named, for the user to delete. A full
disk stops the run in one line (`errors.DiskFullError`, naming the shard); the rerun resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib
import re
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from absl import logging

from gdiff import atomic, distributed, errors, progress, workdir_lock
from gdiff.engine import manifest as manifest_lib

# shard_<process>_<batch>.npz (a one-process run) or shard_<process>of<count>_<batch>.npz.
_SHARD_RE = re.compile(r"^shard_(\d+)(?:of(\d+))?_(\d+)\.npz$")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a run's shards go and how its work splits: `num_batches` global batches, each
    written by every process as one shard per part (a sampling run's part is a guidance scale's
    folder, a bits/dim run has one part).

    A global batch's rows do not depend on the process count (every example's noise and label
    come from its id), so a run stopped under one process count resumes under another: a batch
    is done when a complete set of its shards exists, written under any count. The count is in
    the shard's name (`shard_name`), so the sets of two counts never share a file.
    """

    out: pathlib.Path  # the run's output directory (holds run.json)
    parts: tuple[str, ...]  # sub-folders of `out`, one shard per batch and process in each
    num_batches: int
    process_index: int = 0
    process_count: int = 1

    def shard(
        self, part: str, batch: int, process: int | None = None, count: int | None = None
    ) -> pathlib.Path:
        """The shard of `batch` in `part` that `process` of a `count`-process run writes
        (default: this process of this run)."""
        process = self.process_index if process is None else process
        count = self.process_count if count is None else count
        return self.out / part / shard_name(process, count, batch)

    def complete(self, part: str) -> dict[int, int]:
        """{batch: process count} of the batches of `part` that have a complete set of shards:
        this run's count when its set is complete, else the smallest complete one."""
        found = list_shards(self.out / part)
        counts: dict[int, set[int]] = {}
        for batch, _, n in found:
            counts.setdefault(batch, set()).add(n)
        done = {}
        for b, ns in counts.items():
            for n in sorted(ns, key=lambda n: (n != self.process_count, n)):
                if b < self.num_batches and all((b, p, n) in found for p in range(n)):
                    done[b] = n
                    break
        return done

    def todo(self) -> list[int]:
        """The batches still to draw: those of which some part has no complete set of shards
        (agreed by all, so every process runs the same collective programs)."""
        complete = [self.complete(part) for part in self.parts]
        done = np.array([all(b in c for c in complete) for b in range(self.num_batches)], bool)
        flags = distributed.all_agree(done)
        return [b for b in range(self.num_batches) if not flags[b]]


class Job(Protocol):
    """What a job gives the engine; everything else is the engine's."""

    what: str  # e.g. "sampling run": names the lock and the logs
    unit: str  # progress unit, e.g. "img"
    layout: Layout
    setting: str  # the config key choosing layout.out (named in refusals)
    restart_setting: str | None  # the config key that moves a differing run aside, if any
    restart: bool

    def pin(self) -> dict:
        """Loads what the run computes with and returns its manifest, pins included."""

    def hint(self, manifest: dict) -> str:
        """A sentence added to a refusal (how to finish the old run), or ""."""

    def finished(self, run_id: str) -> bool:
        """Whether the merged outputs exist (raising when they were made under another run)."""

    def start(self, todo: list[int]) -> None:
        """Builds what the batches need (the compiled program); called only when there is work."""

    def compute(self, batch: int) -> dict[str, dict[str, np.ndarray]]:
        """This process's rows of `batch` to keep, per part: {part: {array name: array}}."""

    def units(self, batch: int) -> int:
        """Progress units (e.g. images) of `batch`, as this process's bar counts them."""

    def total_units(self) -> int:
        """Progress units of the whole run."""

    def postfix(self) -> dict[str, str]:
        """Running figures shown beside the bar (e.g. the mean bits/dim so far), or {}."""

    def merge(self, gather: Callable[[str], dict[str, np.ndarray]], run_id: str) -> None:
        """Process 0: writes the outputs; `gather(part)` returns that part's arrays of every
        shard in (batch, process) order, i.e. the global example order."""

    def result(self) -> Any:
        """What the run returns (read from the outputs)."""


def run(job: Job, *, on_batch_done: Callable[[int], None] | None = None) -> Any:
    """Runs `job` to completion, resuming from what is on disk (see the module docstring).

    Every process must call it: the batches left to draw are agreed across hosts, and each batch
    is one collective program.

    Args:
      job: the job.
      on_batch_done: called with the batch index after its shards are written (progress hooks;
        tests inject a failure here to simulate a killed run).
    """
    out = job.layout.out
    # One writer per output directory: a second one would compute every shard again.
    with workdir_lock.hold(out.parent, out.name, what=job.what), _reporting_disk_full(job):
        manifest = job.pin()
        run_id = manifest_lib.run_digest(manifest)
        manifest_lib.check_run_manifest(
            out,
            manifest,
            write=distributed.is_main_process(),
            setting=job.setting,
            restart_setting=job.restart_setting,
            restart=job.restart,
            hint=job.hint(manifest),
        )
        if not _finished(job, manifest, run_id):
            draw(job, run_id, on_batch_done=on_batch_done)
            distributed.barrier(f"gdiff_shards_written_{out.name}")
            if distributed.is_main_process():
                job.merge(functools.partial(_gather, job, run_id=run_id), run_id)
            distributed.barrier(f"gdiff_merged_{out.name}")
        return job.result()


def _finished(job: Job, manifest: dict, run_id: str) -> bool:
    """`job.finished(run_id)`; with the job's restart setting, outputs merged under another run
    (their digest missing or different: run.json was deleted or edited) are moved aside with the
    whole output directory, and the run draws afresh."""
    try:
        done, problem = job.finished(run_id), None
    except errors.ConfigMismatchError as e:
        done, problem = False, e
    # Every process takes the same path (process 0 alone moves the directory, between barriers).
    if distributed.all_agree(np.array([problem is None]))[0]:
        return done
    if not job.restart:
        raise problem or errors.ConfigMismatchError(
            f"another process found outputs in {job.layout.out} merged under another run; use "
            f"another {job.setting}"
        )
    manifest_lib.start_afresh(
        job.layout.out,
        manifest,
        why=str(problem) if problem else "outputs merged under another run",
        write=distributed.is_main_process(),
    )
    return False


@contextlib.contextmanager
def _reporting_disk_full(job: Job):
    """A full disk while the run writes (its manifest, its merged outputs) as one line; a
    shard's write is reported by `draw`, naming the shard."""
    try:
        yield
    except errors.GdiffError:
        raise
    except Exception as e:
        if not errors.is_disk_full(e):
            raise
        raise errors.DiskFullError(
            f"disk full while writing the {job.what} in {job.layout.out}: free space and rerun "
            f"the same command; it resumes from the shards on disk ({_first_line(e)})"
        ) from e


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def draw(job: Job, run_id: str, *, on_batch_done: Callable[[int], None] | None = None) -> None:
    """Computes every batch that some process has no shard of yet; each process writes its own
    shards, tagged with `run_id`. A shard already on disk is never rewritten."""
    todo = job.layout.todo()
    if not todo:
        return
    job.start(todo)
    complete = {part: job.layout.complete(part) for part in job.layout.parts}
    units = [job.units(b) for b in todo]
    total = job.total_units()
    bar = progress.bar(total, initial=total - sum(units), unit=job.unit, desc=job.what)
    start, done = time.perf_counter(), 0
    for i, (b, n) in enumerate(zip(todo, units, strict=True)):
        for part, arrays in job.compute(b).items():
            path = job.layout.shard(part, b)
            # A finished shard is never rewritten; a part whose batch another process count
            # finished (a resumed run) already holds these rows.
            if not path.exists() and b not in complete[part]:
                try:
                    atomic.savez(path, **arrays, **{manifest_lib.RUN_KEY: np.asarray(run_id)})
                except Exception as e:
                    if not errors.is_disk_full(e):
                        raise
                    finished = job.layout.num_batches - len(todo) + i
                    raise errors.DiskFullError(
                        f"disk full while writing the shard {path} of the {job.what} in "
                        f"{job.layout.out}: free space and rerun the same command; it resumes "
                        f"from the {finished} of {job.layout.num_batches} batches on disk "
                        f"({_first_line(e)})"
                    ) from e
        done += n
        if bar is not None:
            # The figures first: a log line written by update() then shows this batch's.
            if postfix := job.postfix():
                bar.set_postfix(**postfix, refresh=False)
            bar.update(n)
        if on_batch_done is not None:
            on_batch_done(b)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - start
    logging.info(
        "%s: %d %s in %.1fs (%.2f %s/s on this process)",
        job.what,
        done,
        job.unit,
        elapsed,
        done / max(elapsed, 1e-9),
        job.unit,
    )


def _gather(job: Job, part: str, *, run_id: str) -> dict[str, np.ndarray]:
    return gather(job.layout, part, run_id, setting=job.setting)


def shard_name(process: int, count: int, batch: int) -> str:
    """The file name of `process`'s shard of `batch` in a run of `count` processes."""
    if count == 1:
        return f"shard_{process}_{batch}.npz"
    return f"shard_{process}of{count}_{batch}.npz"


def list_shards(directory) -> dict[tuple[int, int, int], pathlib.Path]:
    """{(batch, process, process count): path} of the finished shards in one part's directory."""
    found = {}
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return found
    for p in directory.iterdir():
        if m := _SHARD_RE.match(p.name):
            process, count, batch = int(m.group(1)), int(m.group(2) or 1), int(m.group(3))
            if process < count:
                found[(batch, process, count)] = p
    return found


def gather(
    layout: Layout, part: str, run_id: str | None, *, setting: str = "sample.output_dir"
) -> dict[str, np.ndarray]:
    """Every shard of `part` in (batch, process) order, concatenated per array name; of each
    batch the complete set of shards `layout.complete` picks (any process count).

    That order is the global example order, so row i of each result is example i of the run.

    Raises:
      errors.MissingInputError (a FileNotFoundError): a shard is missing (the run is not
        finished).
      errors.InputError (a ValueError): a shard cannot be read (truncated, damaged), or the
        shards hold different arrays.
      errors.ConfigMismatchError: a shard was made under another run than `run_id` (None: not
        checked).
    """
    directory = layout.out / part
    complete = layout.complete(part)
    pieces: list[dict[str, np.ndarray]] = []
    for b in range(layout.num_batches):
        if b not in complete:
            missing = next(
                path
                for p in range(layout.process_count)
                if not (path := layout.shard(part, b, p)).exists()
            )
            raise errors.MissingInputError(
                f"cannot merge {directory}: {missing.name} is missing (rerun to finish it)"
            )
        for p in range(complete[b]):
            path = layout.shard(part, b, p, complete[b])
            arrays = _read_shard(path)
            made = arrays.pop(manifest_lib.RUN_KEY, None)
            made = None if made is None else str(made)
            if run_id is not None and made != run_id:
                raise errors.ConfigMismatchError(
                    f"{path} was drawn under another run ({made or 'unrecorded'}, this "
                    f"one {run_id}); refusing to merge it. Delete it to redraw it, or start "
                    f"afresh with another {setting}"
                )
            pieces.append(arrays)
    names = set(pieces[0]) if pieces else set()
    if any(set(piece) != names for piece in pieces):
        raise errors.InputError(
            f"{directory}: the shards hold different arrays (some lack labels?); delete the "
            "shards of the odd ones out to redraw them"
        )
    return {k: np.concatenate([piece[k] for piece in pieces], axis=0) for k in sorted(names)}


def _read_shard(path: pathlib.Path) -> dict[str, np.ndarray]:
    """A shard's arrays. A finished shard is never rewritten silently, so one that cannot be read
    (cut short, damaged on disk) stops the merge, named, for the user to delete.

    Raises:
      errors.InputError: the file cannot be read.
    """
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # a damaged .npz fails in many ways (BadZipFile, EOFError, zlib.error)
        raise errors.InputError(
            f"cannot read the shard {path} ({type(e).__name__}: {_first_line(e)}): it is "
            "truncated or damaged; delete it and rerun the same command to redraw it"
        ) from e
