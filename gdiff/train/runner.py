"""The loop both trainers share: born-sharded init or exact resume, the jitted step, logging,
checkpoints, periodic actions and clean preemption.

A trainer (diffusion or classifier) describes itself as a `Task`: how to initialise parameters,
its pure `train_step(state, batch) -> (state, metrics)`, and extra periodic actions. `run` does
the rest identically for both, on any mesh: one CPU, eight fake CPU devices, a GPU, a pod.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from gdiff import checkpointing, distributed
from gdiff.data import pipeline
from gdiff.train import loop_utils, optim
from gdiff.train import state as state_lib

# Consecutive non-finite steps after which the run stops (override: train.max_nonfinite_steps).
DEFAULT_MAX_NONFINITE_STEPS = 20


@dataclasses.dataclass
class Task:
    """What differs between the diffusion and the classifier trainer.

    name: "diffusion" or "classifier" (log prefix, checkpoint fingerprint).
    checkpoint_subdir: folder of the workdir holding this task's training checkpoints.
    num_steps, batch_size: total steps and global batch.
    init_params: key -> parameter pytree (run under jit with replicated outputs).
    ema_rates: the EMA copies to keep ([] for none).
    sampler_state: initial timestep-sampler state ({} when stateless).
    train_step: pure (TrainState, batch dict of global arrays) -> (TrainState, metrics dict of
      replicated scalars); must include "loss", "finite" and the state's counters.
    fingerprint: JSON-able description of the state's structure and meaning (resume guard).
    random_crop, random_flip: training augmentation.
    periodic: (interval, fn(state, step, log)) actions run after `step` steps (interval > 0).
    last_keys: metric keys logged as their newest value rather than an interval mean.
    """

    name: str
    checkpoint_subdir: str
    num_steps: int
    batch_size: int
    init_params: Callable[[jax.Array], Any]
    ema_rates: list[str]
    sampler_state: Any
    train_step: Callable[[state_lib.TrainState, dict], tuple[state_lib.TrainState, dict]]
    fingerprint: dict
    random_crop: bool
    random_flip: bool
    periodic: list[tuple[int, Callable]] = dataclasses.field(default_factory=list)
    last_keys: tuple[str, ...] = ("lr", "num_skipped", "nonfinite_streak", "param_norm")


def initialize_distributed(config) -> None:
    """`gdiff.distributed.maybe_initialize`, unless the runtime is already up (main.py, tests)."""
    if jax.distributed.is_initialized():
        return
    distributed.maybe_initialize(config.get("distributed", "auto"))


def abstract_with_sharding(tree: Any, sharding) -> Any:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def _scalar(x) -> float:
    """A replicated (possibly multi-host) scalar -> float, without a collective."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return float(np.asarray(x))


def _restore_external(path: str, abstract):
    """Restores `train.resume_checkpoint`: a checkpoint directory or one of its step folders."""
    p = pathlib.Path(path).absolute()
    if not p.exists():
        raise FileNotFoundError(f"train.resume_checkpoint={path!r} does not exist")
    is_manager_dir = any(c.is_dir() and c.name.isdigit() for c in p.iterdir())
    if p.name.isdigit() and not is_manager_dir:
        manager, step = checkpointing.CheckpointManager(p.parent), int(p.name)
    else:
        manager, step = checkpointing.CheckpointManager(p), None
    try:
        return manager.restore(abstract, step=step)
    finally:
        manager.close()


def run(
    config,
    workdir: str,
    task: Task,
    *,
    mesh: jax.sharding.Mesh | None = None,
    stop_at_step: int | None = None,
) -> dict:
    """Trains `task` to `task.num_steps` (or `stop_at_step`), resuming from the workdir if possible.

    Returns:
      dict(state=final TrainState, history=list of per-step dicts (step, loss, finite),
      start_step=the step this invocation started from, stopped_early=bool).
    """
    mesh = distributed.data_mesh() if mesh is None else mesh
    repl, batch_sh = distributed.replicated(mesh), distributed.batch_sharding(mesh)
    tx = optim.create_optimizer(config.optim)
    base_key = jax.random.key(config.seed)

    def init_state():
        params = task.init_params(jax.random.fold_in(base_key, 0))
        return state_lib.create(
            params, tx, rng=base_key, ema_rates=task.ema_rates, sampler_state=task.sampler_state
        )

    abstract = abstract_with_sharding(jax.eval_shape(init_state), repl)
    workdir_path = pathlib.Path(workdir)
    manager = checkpointing.CheckpointManager(
        workdir_path / task.checkpoint_subdir,
        max_to_keep=config.train.max_to_keep,
        config_fingerprint=task.fingerprint,
    )
    latest = manager.latest_step()
    if latest is not None:
        logging.info("%s: resuming from %s step %d", task.name, manager.directory, latest)
        state = manager.restore(abstract)
    elif config.train.resume_checkpoint:
        logging.info("%s: starting from %s", task.name, config.train.resume_checkpoint)
        state = _restore_external(config.train.resume_checkpoint, abstract)
    else:
        state = jax.jit(init_state, out_shardings=repl)()
    start = int(_scalar(state.step))
    end = task.num_steps if stop_at_step is None else min(task.num_steps, stop_at_step)
    if jax.process_index() == 0:
        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        logging.info("%s: %d parameters, steps %d -> %d", task.name, n_params, start, end)

    step_fn = jax.jit(
        task.train_step,
        in_shardings=(repl, batch_sh),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
    )
    batches = pipeline.local_batches(
        config,
        global_batch_size=task.batch_size,
        mesh=mesh,
        start_step=start,
        random_crop=task.random_crop,
        random_flip=task.random_flip,
    )
    log = loop_utils.MetricsLog(workdir, name=f"metrics_{task.name}.jsonl")
    acc = loop_utils.MetricAccumulator(last=task.last_keys)
    timer = loop_utils.StepTimer(start)
    preempt = loop_utils.Preemption(sync_every=config.train.log_every)
    max_bad = int(config.train.get("max_nonfinite_steps", DEFAULT_MAX_NONFINITE_STEPS))
    log_every = max(int(config.train.log_every), 1)
    history: list[dict] = []
    profiler = _maybe_profiler(config, workdir, end)
    bar = _progress_bar(config, task.name, start, end)

    def consume(step: int, metrics: dict) -> None:
        m = {k: _scalar(v) for k, v in metrics.items()}
        history.append({"step": step, "loss": m["loss"], "finite": bool(m["finite"])})
        if not m["finite"]:
            logging.warning(
                "%s step %d: non-finite loss or gradients; update skipped (%d skipped so far)",
                task.name,
                step,
                int(m["num_skipped"]),
            )
        if m["nonfinite_streak"] >= max_bad:
            raise FloatingPointError(
                f"{task.name} training stopped at step {step}: the loss or gradients were "
                f"non-finite for {int(m['nonfinite_streak'])} consecutive steps (limit "
                "train.max_nonfinite_steps); lower optim.lr, enable optim.grad_clip or check the "
                "data. The last checkpoint was left as it was."
            )
        acc.add({k: v for k, v in m.items() if k != "finite"})

    pending = None
    saved_at = None
    stopped_early = False
    try:
        for step in range(start, end):
            if preempt.should_stop(step):
                stopped_early = True
                break
            batch = pipeline.to_global(next(batches), mesh)
            state, metrics = step_fn(state, batch)
            # Read the previous step's metrics only now: the device already works on this one.
            if pending is not None:
                consume(*pending)
            done = step + 1
            pending = (done, metrics)
            if profiler is not None:
                profiler(done)
            if bar is not None:
                bar.update(1)
            if done % log_every == 0 or done == end:
                consume(*pending)
                pending = None
                scalars = acc.result()
                scalars["steps_per_sec"] = timer.rate(done)
                scalars["examples"] = done * task.batch_size
                log.scalars(done, {f"{k}": v for k, v in scalars.items()})
                acc.reset()
            if done % max(int(config.train.save_every), 1) == 0:
                manager.save(done, state)
                saved_at = done
            for interval, action in task.periodic:
                if interval > 0 and done % interval == 0:
                    action(state, done, log)
        if pending is not None:
            consume(*pending)
        final = int(_scalar(state.step))
        if saved_at != final and final > start:
            manager.save(final, state, force=True)
        if stopped_early:
            logging.warning("%s: preempted; saved step %d, exiting cleanly", task.name, final)
    finally:
        if bar is not None:
            bar.close()
        manager.wait_until_finished()
        manager.close()
        log.close()
        preempt.restore()
    return {"state": state, "history": history, "start_step": start, "stopped_early": stopped_early}


def _progress_bar(config, name: str, start: int, end: int):
    """A tqdm bar over this invocation's steps (process 0, `train.progress`), or None."""
    if not config.train.get("progress", True) or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=end, initial=start, desc=f"train {name}", unit="step", dynamic_ncols=True)


def _maybe_profiler(config, workdir: str, end: int):
    if not config.train.get("profile", False):
        return None
    try:
        from clu import periodic_actions

        return periodic_actions.Profile(logdir=workdir, num_profile_steps=5)
    except ImportError as e:
        logging.warning("train.profile needs clu's periodic_actions (%s); not profiling", e)
        return None


def global_norm(tree: Any) -> jax.Array:
    import optax

    return optax.tree.norm(tree)


def apply_update(
    state: state_lib.TrainState,
    tx,
    grads: Any,
    loss: jax.Array,
    lr: jax.Array,
    *,
    sampler_state: Any,
) -> tuple[state_lib.TrainState, dict]:
    """One optimiser + EMA step, or none when the loss/gradients are not finite.

    Returns the new state (step always advances, so the data and rng streams move on) and the
    shared metrics: lr, grad_norm, param_norm, finite, num_skipped, nonfinite_streak.
    """
    import jax.numpy as jnp
    import optax

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    opt_state = optim.set_learning_rate(state.opt_state, lr)
    # Zero gradients keep the arithmetic finite in the branch that is thrown away.
    safe = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    updates, new_opt = tx.update(safe, opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_ema = state_lib.update_ema(state.ema_params, new_params)

    def pick(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=pick(new_params, state.params),
        ema_params=pick(new_ema, state.ema_params),
        opt_state=pick(new_opt, opt_state),
        sampler_state=pick(sampler_state, state.sampler_state),
        num_skipped=state.num_skipped + skipped,
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
    )
    metrics = {
        "lr": lr,
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(new_state.params),
        "finite": finite.astype(jnp.float32),
        "num_skipped": new_state.num_skipped,
        "nonfinite_streak": new_state.nonfinite_streak,
    }
    return new_state, metrics


def _fetch(tree: Any) -> Any:
    """Replicated (possibly multi-host) arrays -> numpy, from this process's own copy."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        return np.asarray(x)

    return jax.tree.map(get, tree)
