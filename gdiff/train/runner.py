"""The loop both trainers share: born-sharded init or exact resume, the jitted step, checkpoints,
periodic actions and clean preemption.

A trainer (diffusion or classifier) describes itself as a `gdiff.train.task.Task`: how to
initialise parameters, its pure `train_step(state, batch) -> (state, metrics)`, and extra periodic
actions. `run` does the rest identically for both, on any mesh: one CPU, eight fake CPU devices, a
GPU, a pod. The update rule inside a step is `gdiff.train.update`; the metrics side is
`loop_utils.TrainMetrics`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import tqdm
from absl import logging

from gdiff import distributed, errors, progress, workdir_lock, xla_options
from gdiff.checkpoints import input_state, locate, store
from gdiff.data import pipeline
from gdiff.train import loop_utils, optim, preemption, sharding
from gdiff.train import state as state_lib
from gdiff.train import task as task_lib


def initialize_distributed(config) -> None:
    """`gdiff.distributed.maybe_initialize`, unless the runtime is already up (main.py, tests)."""
    if jax.distributed.is_initialized():
        return
    distributed.maybe_initialize(config.distributed)


# import_run(location, *, params_like, tx, ema_rates, rng, sampler_state, optim_config) ->
# TrainState: reads a foreign training run that `train.resume_checkpoint` names (a reference
# PyTorch run: gdiff/compat/reference_run.py load_train_state). The command line hands it down;
# the loop itself knows no foreign format.
ImportRun = Callable[..., state_lib.TrainState]


def train(
    config,
    workdir: str,
    build_task: Callable[[Any, jax.sharding.Mesh], task_lib.Task],
    *,
    mesh: jax.sharding.Mesh | None = None,
    stop_at_step: int | None = None,
    import_run: ImportRun | None = None,
) -> dict:
    """A trainer's entry point: checks the data config, builds its Task on the mesh (default: all
    devices), and `run`s it."""
    initialize_distributed(config)
    pipeline.check_data_config(config)
    mesh = distributed.data_mesh() if mesh is None else mesh
    task = build_task(config, mesh)
    return run(config, workdir, task, mesh=mesh, stop_at_step=stop_at_step, import_run=import_run)


def compile_step(
    task: task_lib.Task, mesh: jax.sharding.Mesh, state_shardings: Any = None
) -> Callable:
    """The task's train step as training runs it (and benchmarks/bench_training.py times it):
    the state in `state_shardings` (a TrainState of NamedShardings from
    `sharding.state_shardings`; None: replicated) and donated, so XLA updates parameters, EMA
    and optimizer state in place, in the same layout; the batch sharded over every device; the
    production compile options. Under FSDP the same in and out shardings make XLA gather each
    parameter where it is used and reduce-scatter its gradient."""
    repl = distributed.replicated(mesh)
    state_sh = repl if state_shardings is None else state_shardings
    return jax.jit(
        task.train_step,
        in_shardings=(state_sh, distributed.batch_sharding(mesh)),
        out_shardings=(state_sh, repl),
        donate_argnums=(0,),
        compiler_options=xla_options.compiler_options(),
    )


def abstract_with_sharding(tree: Any, sharding) -> Any:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def run(
    config,
    workdir: str,
    task: task_lib.Task,
    *,
    mesh: jax.sharding.Mesh | None = None,
    stop_at_step: int | None = None,
    import_run: ImportRun | None = None,
) -> dict:
    """Trains `task` to `task.num_steps` (or `stop_at_step`), resuming from the workdir if possible.

    `import_run` reads a foreign run named by `train.resume_checkpoint` (see `ImportRun`); without
    it such a run is refused in one line.

    Returns:
      dict(state=final TrainState, history=list of per-step dicts (step, loss, finite),
      start_step=the step this invocation started from, stopped_early=bool).
    """
    mesh = distributed.data_mesh() if mesh is None else mesh
    # One trainer per task and workdir: a second one would save the same steps and interleave
    # the metrics rows (released when this run ends; a killed run's lock is found stale).
    with workdir_lock.hold(workdir, f"train_{task.name}", what=f"{task.name} training"):
        loop = _start(config, workdir, task, mesh, stop_at_step, import_run)
        try:
            loop.train()
            loop.finish()
        finally:
            loop.close()
    return {
        "state": loop.state,
        "history": loop.metrics.history,
        "start_step": loop.start,
        "stopped_early": loop.stopped_early,
    }


@dataclasses.dataclass
class _Loop:
    """One invocation of `run`: what it set up, where it stands, and how it steps and ends."""

    config: Any
    task: task_lib.Task
    mesh: jax.sharding.Mesh
    manager: store.CheckpointManager
    state: state_lib.TrainState
    start: int
    end: int
    step_fn: Callable
    batches: Iterator
    metrics: loop_utils.TrainMetrics
    preempt: preemption.Preemption
    profiler: Callable[[int], Any] | None
    bar: tqdm.tqdm | None
    saved_at: int | None = None
    stopped_early: bool = False

    def train(self) -> None:
        for step in range(self.start, self.end):
            if self.preempt.should_stop(step):
                self.stopped_early = True
                return
            self.step(step)

    def step(self, step: int) -> None:
        batch = pipeline.to_global(next(self.batches), self.mesh)
        self.state, metrics = self.step_fn(self.state, batch)
        done = step + 1
        # Kept on the device; the interval's row reads every step's metrics in one transfer
        # (loop_utils.TrainMetrics).
        self.metrics.record(done, metrics, self.end)
        if self.profiler is not None:
            self.profiler(done)
        if self.bar is not None:
            self.bar.update(1)
        # 0 turns periodic saves off, as 0 does for every `*_every` key (the final step and a
        # preemption are still saved, in `finish`).
        save_every = int(self.config.train.save_every)
        if save_every > 0 and done % save_every == 0:
            self._save(done)
        for interval, action in self.task.periodic:
            if interval > 0 and done % interval == 0:
                action(self.state, done, self.metrics.log)

    def _save(self, step: int, *, force: bool = False) -> None:
        """Saves `step`, unless the state is inside a non-finite streak: a poisoned state is never
        persisted, so a rerun (e.g. with a lower optim.lr) resumes from the last clean step."""
        streak = int(distributed.host_copy(self.state.nonfinite_streak))
        if streak:
            logging.warning(
                "%s: not saving step %d (the last %d step(s) were non-finite); the last clean "
                "checkpoint stays the newest",
                self.task.name,
                step,
                streak,
            )
            return
        self.manager.save(step, self.state, force=force)
        # The input's position beside the step (a few bytes per process): the resumed run's
        # first batch is this run's next one, whatever the step (gdiff/checkpoints/input_state.py).
        oldest = min(self.manager.all_steps(), default=step)
        input_state.save(self.manager.directory, step, self.batches.get_state(), oldest_kept=oldest)
        self.saved_at = step

    def finish(self) -> None:
        """Reads the last metrics and saves the final step (unless it just was)."""
        self.metrics.flush()
        final = int(distributed.host_copy(self.state.step))
        if self.saved_at != final and final > self.start:
            self._save(final, force=True)
        if self.stopped_early:
            logging.warning("%s: preempted; saved step %d, exiting cleanly", self.task.name, final)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.manager.wait_until_finished()
        self.manager.close()
        self.metrics.close()
        self.preempt.restore()
        self.batches.close()


def _start(
    config, workdir: str, task: task_lib.Task, mesh, stop_at_step: int | None, import_run
) -> _Loop:
    """Opens the checkpoints, restores or initialises the state, compiles the step."""
    manager = store.CheckpointManager(
        pathlib.Path(workdir) / task.checkpoint_subdir,
        max_to_keep=config.train.max_to_keep,
        keep_every=int(config.train.keep_every),
        config_fingerprint=task.fingerprint,
        ignore_keys=task_lib.RUNTIME_KEYS,
    )
    mode = sharding.check_mode(config.train.state_sharding)
    state, shardings = _init_or_resume(config, task, manager, mesh, import_run)
    start = int(distributed.host_copy(state.step))
    _report_schedule_change(config, task, manager, start)
    end = task.num_steps if stop_at_step is None else min(task.num_steps, stop_at_step)
    if jax.process_index() == 0:
        logging.info(
            "%s: steps %d -> %d, parameters:\n%s",
            task.name,
            start,
            end,
            _parameter_overview(state.params),
        )
        # Measured from the arrays this process holds, after init or restore.
        logging.info("%s", sharding.state_bytes_line(task.name, state, mode, mesh.size))
    step_fn = compile_step(task, mesh, shardings)
    batches = pipeline.local_batches(
        config,
        global_batch_size=task.batch_size,
        mesh=mesh,
        start_step=start,
        input_state=input_state.load(manager.directory, start) if start else None,
        random_crop=task.random_crop,
        random_flip=task.random_flip,
    )
    metrics = loop_utils.TrainMetrics(
        workdir,
        task.name,
        batch_size=task.batch_size,
        start_step=start,
        num_steps=end,
        log_every=config.train.log_every,
        max_nonfinite=int(config.train.max_nonfinite_steps),
        last_keys=task.last_keys,
    )
    metrics.log.hparams(config.to_dict())
    return _Loop(
        config=config,
        task=task,
        mesh=mesh,
        manager=manager,
        state=state,
        start=start,
        end=end,
        step_fn=step_fn,
        batches=batches,
        metrics=metrics,
        preempt=preemption.Preemption(sync_every=config.train.log_every),
        profiler=_maybe_profiler(config, workdir),
        bar=_progress_bar(config, task.name, start, end),
    )


def _report_schedule_change(config, task: task_lib.Task, manager, start: int) -> None:
    """Logs how the optimiser and run-time settings changed since the run that wrote the
    checkpoints. They are not part of the resume fingerprint: lowering optim.lr after a non-finite
    stop is the advised fix (the rate is recomputed from the config every step,
    gdiff/train/optim.py), and precision, attention kernel and remat are how, not what, a network
    computes (task.RUNTIME_KEYS)."""
    settings = {
        "optim": config.optim.to_dict(),
        "num_steps": task.num_steps,
        **task_lib.runtime_settings(config),
    }
    for change in manager.note_settings(settings):
        logging.warning(
            "%s: %s since the checkpoint; the schedule follows this config from step %d",
            task.name,
            change,
            start,
        )


def state_initializer(config, task: task_lib.Task) -> Callable[[], state_lib.TrainState]:
    """The fresh state of a run as a function of nothing (for jit and `jax.eval_shape`): the
    task's parameters from fold_in(key(seed), 0), EMA copies, AdamW moments, the run's key."""
    tx = optim.create_optimizer(config.optim)
    base_key = jax.random.key(config.seed)

    def init_state():
        params = task.init_params(jax.random.fold_in(base_key, 0))
        return state_lib.create(
            params, tx, rng=base_key, ema_rates=task.ema_rates, sampler_state=task.sampler_state
        )

    return init_state


def _init_or_resume(
    config, task: task_lib.Task, manager, mesh, import_run: ImportRun | None
) -> tuple[state_lib.TrainState, state_lib.TrainState]:
    """(state, its shardings): the workdir's newest checkpoint, else `train.resume_checkpoint` (a
    gdiff training checkpoint, or a reference PyTorch run: gdiff/compat/reference_run.py), else a
    fresh state; every one born in the layout of `train.state_sharding` on the mesh (whatever
    layout and device count wrote the checkpoint)."""
    tx = optim.create_optimizer(config.optim)
    base_key = jax.random.key(config.seed)
    init_state = state_initializer(config, task)
    shapes = jax.eval_shape(init_state)
    shardings = sharding.state_shardings(
        shapes, mesh, config.train.state_sharding, int(config.train.fsdp_min_elements)
    )
    abstract = sharding.with_shardings(shapes, shardings)
    if manager.latest_step() is not None:
        state, step = manager.restore_newest_intact(abstract)
        logging.info("%s: resuming from %s step %d", task.name, manager.directory, step)
        return state, shardings
    path = config.train.resume_checkpoint
    if not path:
        # Born sharded (big_vision's way): each device computes only its own part of the state.
        return jax.jit(init_state, out_shardings=shardings)(), shardings
    logging.info("%s: starting from %s", task.name, path)
    try:
        loc = locate.locate(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"train.resume_checkpoint={path!r}: {e}") from e
    if loc.format == "reference_run":
        if import_run is None:
            raise errors.ConfigError(
                f"train.resume_checkpoint={path!r} is a reference (PyTorch) training run; "
                "continue it with --mode=train (or --mode=train_classifier), which reads it"
            )
        state = import_run(
            loc,
            params_like=abstract.params,
            tx=tx,
            ema_rates=task.ema_rates,
            rng=base_key,
            sampler_state=task.sampler_state,
            optim_config=config.optim,
        )
        return jax.device_put(state, shardings), shardings
    return _restore_external(path, loc, abstract), shardings


def _restore_external(path: str, loc: locate.Location, abstract: Any):
    """Restores `train.resume_checkpoint`: a training checkpoint directory or one of its steps."""
    if loc.format != "training":
        raise ValueError(
            f"train.resume_checkpoint={path!r} is a parameter checkpoint (inference weights "
            "only), not a resumable training state (step, optimiser, EMA); give a training "
            "checkpoint directory or one of its step folders"
        )
    manager = store.CheckpointManager(loc.path)
    try:
        return manager.restore(abstract, step=loc.step)
    finally:
        manager.close()


def _parameter_overview(params) -> str:
    """clu's table of every parameter (name, shape, size, mean, std) and the total count."""
    from clu import parameter_overview  # clu's package pulls in TensorFlow; see loop_utils

    # Shapes and sizes only: statistics would need every host's copy of replicated arrays.
    return parameter_overview.get_parameter_overview(params, include_stats=False)


def _progress_bar(config, name: str, start: int, end: int) -> tqdm.tqdm | None:
    """A bar over this invocation's steps (`train.progress`; see gdiff/progress.py), or None."""
    if not config.train.progress:
        return None
    return progress.bar(end, initial=start, desc=f"train {name}", unit="step")


def _maybe_profiler(config, workdir: str) -> Callable[[int], Any] | None:
    """clu's profiler of a few steps (`train.profile`), or None."""
    if not config.train.profile:
        return None
    try:
        # Imported here, not at the top: clu's periodic_actions imports its metric writers, which
        # import TensorFlow (seconds of start-up) that only a profiled run needs.
        from clu import periodic_actions

        return periodic_actions.Profile(logdir=workdir, num_profile_steps=5)
    except ImportError as e:
        logging.warning("train.profile needs clu's periodic_actions (%s); not profiling", e)
        return None
