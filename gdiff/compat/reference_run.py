"""Continues a reference (PyTorch) training run in gdiff: `TrainLoop.save()` files -> TrainState.

guided-diffusion's `TrainLoop.save()` writes, for step N (`{N:06d}` in every name):

    model<N>.pt          the model's state dict (float32 master parameters)
    ema_<rate>_<N>.pt    per EMA rate: the EMA parameters by name
    opt<N>.pt            torch.optim.AdamW.state_dict(): {"state": {i: {step, exp_avg,
                         exp_avg_sq}}, "param_groups": [{lr, betas, eps, weight_decay, params}]},
                         parameters numbered in `model.parameters()` order (the state dict's
                         order: the ADM networks have no buffers)

Set `train.resume_checkpoint` to the model file (or its folder, for the newest step) and gdiff
resumes exactly as the reference's own resume does: step N, the run's parameters, its EMA copies
(an EMA rate without a file starts from the parameters, as `TrainLoop._load_ema_parameters`) and
AdamW's moments and step count mapped onto optax's adamw state (mu = exp_avg, nu = exp_avg_sq,
count = step). No PyTorch is needed (gdiff/checkpoints/torch_file.py reads the files). Runs
trained with `use_fp16` store AdamW's moments over two flattened master tensors (1-D parameters,
then the others, each in parameter order); those are split back per parameter. A
classifier_train.py run (model<N>.pt and opt<N>.pt, no EMA) continues the same way under
--mode=train_classifier.

What the files do not hold starts fresh: the loss-aware timestep sampler's history (the reference
does not save it either), the data order and the random stream (gdiff's own, from `config.seed`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
from typing import Any

import jax
import numpy as np
from absl import logging

from gdiff.checkpoints import locate, torch_file
from gdiff.compat import convert
from gdiff.train import optim
from gdiff.train import state as state_lib

_EMA_FILE = re.compile(r"^ema_(.+)_(\d+)\.pt$")


@dataclasses.dataclass(frozen=True)
class ReferenceRun:
    """The files of one saved step of a reference run."""

    step: int
    model: pathlib.Path
    ema: dict[str, pathlib.Path]  # rate as written in the file name -> file
    opt: pathlib.Path | None


def find_run(location: locate.Location) -> ReferenceRun:
    """The files of the step `locate.locate` found (format "reference_run")."""
    if location.format != "reference_run":
        raise ValueError(f"{location.path} is a {location.format} checkpoint, not a reference run")
    folder, step = location.path, int(location.step)
    ema = {}
    for path in folder.iterdir():
        match = _EMA_FILE.match(path.name)
        if match and int(match.group(2)) == step:
            ema[match.group(1)] = path
    opt = folder / f"opt{step:06d}.pt"
    return ReferenceRun(step, folder / f"model{step:06d}.pt", ema, opt if opt.exists() else None)


def _split_fp16_groups(moments: list[np.ndarray], shapes: list[tuple]) -> list[np.ndarray]:
    """The reference's fp16 master parameters: [1-D params flattened, others flattened] ->
    one array per parameter, in parameter order."""
    vectors = [i for i, s in enumerate(shapes) if len(s) <= 1]
    matrices = [i for i, s in enumerate(shapes) if len(s) > 1]
    out: list[Any] = [None] * len(shapes)
    for flat, members in zip(moments, (vectors, matrices), strict=True):
        flat, offset = np.ravel(flat), 0
        for i in members:
            size = math.prod(shapes[i])
            out[i] = flat[offset : offset + size].reshape(shapes[i])
            offset += size
    return out


def adam_moments(opt: dict, shapes: dict[str, tuple], where: str) -> tuple[int, dict, dict]:
    """(step, {name: exp_avg}, {name: exp_avg_sq}) of an AdamW state dict.

    Args:
      opt: `torch.optim.AdamW.state_dict()` as `load_torch_file` returns it.
      shapes: the model's parameter shapes in `model.parameters()` order (the state dict's).
      where: the file, for error messages.

    Raises:
      ValueError: the optimiser was not over this model's parameters (their number or sizes
        differ), or its parameters took different numbers of steps.
    """
    names = list(shapes)
    index = [i for group in opt["param_groups"] for i in group["params"]]
    state = opt["state"]
    entries = [state.get(i) for i in index]
    zeros = [np.zeros(shapes[n], np.float32) for n in names]
    sizes = [int(np.size(e["exp_avg"])) for e in entries if e is not None]
    if len(index) == len(names):
        mu = [zeros[j] if e is None else e["exp_avg"] for j, e in enumerate(entries)]
        nu = [zeros[j] if e is None else e["exp_avg_sq"] for j, e in enumerate(entries)]
    elif len(index) == 2 and len(sizes) == 2 and sum(sizes) == sum(z.size for z in zeros):
        mu = _split_fp16_groups([e["exp_avg"] for e in entries], list(shapes.values()))
        nu = _split_fp16_groups([e["exp_avg_sq"] for e in entries], list(shapes.values()))
    else:
        raise ValueError(
            f"{where} optimises {len(index)} tensors ({sum(sizes)} values); the model has "
            f"{len(names)} parameters: not this model's optimiser state"
        )
    steps = {int(np.asarray(e["step"])) for e in entries if e is not None}
    if len(steps) > 1:
        raise ValueError(f"{where}: parameters took different numbers of steps {sorted(steps)}")
    if any(e is None for e in entries):
        logging.warning("%s: some parameters have no AdamW state; they start from zero", where)
    step = steps.pop() if steps else 0
    return step, dict(zip(names, mu, strict=True)), dict(zip(names, nu, strict=True))


def _check_hyperparameters(opt: dict, optim_config, where: pathlib.Path) -> None:
    """Warns where the run's AdamW settings differ from this config's (a fine-tune may mean it;
    an exact continuation needs them equal). The learning rate is this config's schedule's."""
    group = opt["param_groups"][0]
    stored = {
        "b1": float(group["betas"][0]),
        "b2": float(group["betas"][1]),
        "eps": float(group["eps"]),
        "weight_decay": float(group["weight_decay"]),
    }
    differ = [
        f"optim.{k}: run {v!r} vs config {float(optim_config[k])!r}"
        for k, v in stored.items()
        if not math.isclose(v, float(optim_config[k]), rel_tol=1e-6)
    ]
    if differ:
        logging.warning("%s: AdamW settings differ from the config: %s", where, "; ".join(differ))
    logging.info("%s: the run's last learning rate was %g", where, float(group["lr"]))


def _ema_params(run: ReferenceRun, rate: str, params: Any, to_params) -> Any:
    """The run's EMA copy at `rate`, or (no file, as the reference) a copy of the parameters."""
    for written, path in run.ema.items():
        if math.isclose(float(written), float(rate), rel_tol=1e-9):
            return to_params(torch_file.load_torch_state_dict(path), path)
    logging.warning(
        "reference run %s has no ema_%s_%06d.pt (it has rates %s): EMA %s starts from the "
        "parameters, as the reference's resume does",
        run.model.parent,
        rate,
        run.step,
        sorted(run.ema),
        rate,
    )
    return jax.tree.map(np.copy, params)


def load_train_state(
    location: locate.Location,
    *,
    params_like: Any,
    tx,
    ema_rates: list[str],
    rng: jax.Array,
    sampler_state: Any,
    optim_config,
) -> state_lib.TrainState:
    """A TrainState at the run's step, continuing it exactly (host numpy arrays).

    Args:
      location: what `locate.locate` found (format "reference_run").
      params_like: the parameter tree of this config's network (arrays or ShapeDtypeStructs).
      tx: this config's optimiser (`optim.create_optimizer`).
      ema_rates: the EMA copies this config keeps (`train.ema_rates`).
      rng: the run's base key (gdiff's own stream; the reference's is not in the files).
      sampler_state: the timestep sampler's initial state.
      optim_config: `config.optim`, checked against the run's AdamW settings (warnings only).

    Raises:
      ValueError: a file does not match this config's network (every mismatched name listed with
        both shapes) or the optimiser state is not over its parameters.
    """
    run = find_run(location)

    def to_params(state_dict, path):
        target = f"this config's network (reading {path})"
        return convert.convert_params(params_like, state_dict, target=target)

    state_dict = torch_file.load_torch_state_dict(run.model)
    params = to_params(state_dict, run.model)
    ema = {rate: _ema_params(run, rate, params, to_params) for rate in ema_rates}
    state = state_lib.create(params, tx, rng=rng, ema_rates=[], sampler_state=sampler_state)
    opt_state = state.opt_state
    if run.opt is None:
        logging.warning("%s: no opt%06d.pt; AdamW starts afresh", run.model.parent, run.step)
    else:
        opt = torch_file.load_torch_file(run.opt)
        _check_hyperparameters(opt, optim_config, run.opt)
        shapes = {name: tuple(v.shape) for name, v in state_dict.items()}
        count, mu, nu = adam_moments(opt, shapes, str(run.opt))
        opt_state = optim.with_adam_moments(
            opt_state, count=count, mu=to_params(mu, run.opt), nu=to_params(nu, run.opt)
        )
    logging.info("continuing reference run %s at step %d", run.model, run.step)
    return state.replace(step=np.int32(run.step), ema_params=ema, opt_state=opt_state)
