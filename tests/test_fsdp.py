"""Sharded training state (train.state_sharding=fsdp) on 8 fake CPU devices: the FSDP rule, the
replicated step's numerics, the bytes per device the start-up log reports, and checkpoints that
restore across layouts and device counts."""

import logging
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import tiny
from gdiff import distributed, errors
from gdiff.checkpoints import locate
from gdiff.train import diffusion_trainer, sharding

STEPS = 4
LR = 2e-3  # configs/tiny.py's optim.lr


def _config(mode: str, **train):
    config = tiny.get_config()
    config.train.num_steps = STEPS
    config.train.log_every = 1
    config.train.save_every = 2
    config.train.progress = False
    config.train.state_sharding = mode
    # Every array with a dimension 8 divides is split: at the default (2**14 elements) most of
    # this 32-channel network's arrays count as small and stay whole.
    config.train.fsdp_min_elements = 0
    for key, value in train.items():
        config.train[key] = value
    return config


class _Lines(logging.Handler):
    """Collects the messages of absl's logger (the runner logs through it)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _train(config, workdir, **kwargs):
    """diffusion_trainer.train, plus the state-bytes line it logged at start-up."""
    handler, logger = _Lines(), logging.getLogger("absl")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # absl's default verbosity drops INFO before any handler
    try:
        result = diffusion_trainer.train(config, str(workdir), **kwargs)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [m for m in handler.lines if "state sharding" in m]
    assert len(lines) == 1, handler.lines
    return result, lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4 steps under both layouts; the FSDP run checkpoints steps 2 and 4."""
    out = {}
    for mode in sharding.MODES:
        workdir = tmp_path_factory.mktemp(mode)
        result, line = _train(_config(mode, save_every=2 if mode == "fsdp" else 0), workdir)
        out[mode] = {"workdir": workdir, "result": result, "line": line}
    return out


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_the_fsdp_rule_and_the_mode_key():
    # The largest dimension the device count divides; of equal sizes the last; small or
    # indivisible arrays whole.
    assert sharding.fsdp_spec((3, 3, 256, 512), 8, 0) == P(None, None, None, "data")
    assert sharding.fsdp_spec((3, 3, 256, 256), 8, 0) == P(None, None, None, "data")
    assert sharding.fsdp_spec((1000, 768), 16, 0) == P(None, "data")  # 1000 = 16 * 62.5
    assert sharding.fsdp_spec((6,), 8, 0) == P()
    assert sharding.fsdp_spec((), 8, 0) == P()
    assert sharding.fsdp_spec((256,), 8, 2**14) == P()  # a bias: too small to be worth a gather
    assert sharding.fsdp_spec((128, 128), 8, 2**14) == P(None, "data")
    assert sharding.fsdp_spec((128, 128), 1, 0) == P()
    with pytest.raises(errors.ConfigError, match="train.state_sharding must be one of"):
        sharding.check_mode("zero3")


def test_fsdp_state_is_born_sharded_and_holds_an_eighth_per_device(runs):
    fsdp, repl = runs["fsdp"]["result"]["state"], runs["replicated"]["result"]["state"]
    fields = lambda s: [getattr(s, f) for f in sharding.SHARDED_FIELDS]  # noqa: E731
    # Each array laid out by the rule: all but the scalars (Adam's count, the injected learning
    # rate) and the output convolution's 6 biases are split.
    leaves = jax.tree.leaves(fields(fsdp))
    for x in leaves:
        assert x.sharding.spec == sharding.fsdp_spec(x.shape, 8, 0), (x.shape, x.sharding)
    whole = [x.shape for x in leaves if x.sharding.is_fully_replicated]
    assert sorted(set(whole)) == [(), (6,)] and len(leaves) - len(whole) > 400
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(repl))
    for x in (fsdp.step, fsdp.rng, fsdp.num_skipped):
        assert x.sharding.is_fully_replicated
    # Measured from the arrays' addressable shards: what the rule's arithmetic predicts.
    measured = {m: sharding.bytes_per_device(fields(runs[m]["result"]["state"])) for m in runs}
    shapes = jax.eval_shape(lambda: fields(fsdp))
    for mode in runs:
        assert measured[mode] == sharding.planned_bytes_per_device(shapes, 8, mode, 0)
    full = sum(x.nbytes for x in jax.tree.leaves(fields(fsdp)))
    assert measured["replicated"] == full
    assert full / 8 <= measured["fsdp"] < full / 8 + 1024
    # ... and the start-up log line says it, for both modes.
    for mode in runs:
        mib = f"{measured[mode] / 2**20:.2f} MiB per device"
        assert f"state sharding {mode} over 8 device(s)" in runs[mode]["line"]
        assert mib in runs[mode]["line"], runs[mode]["line"]


def _assert_same_training(got, want, steps: int):
    """`got` (a TrainState after `steps` steps) equals `want` up to the summation order of the
    gradient.

    Not bitwise: with the parameters split, XLA's partitioner sums each weight gradient over
    another partition of the batch (a reduce-scatter where the replicated step all-reduces; even
    a replicated constraint on the gradients leaves them different in the last bits), and
    rounding differs. In most parameters that is float32 rounding. In some it is not: ADM's
    GroupNorm with one channel per group (this 32-channel network's 32 groups) cancels any
    per-channel shift, so the gradient of a bias in front of it is mathematically zero and in
    floating point pure rounding noise (|g| ~ 1e-12 to 1e-10), whose sign the summation order
    decides. Adam divides that noise by its own tiny second moment and moves such a parameter
    by a sizeable part of lr per step, in a direction that differs between the layouts (as it
    would between device counts). The tightest tolerances that hold, per field (measured after
    4 steps, jax 0.10.2 on XLA:CPU: relative L2 1.3e-5 / 1.3e-6 / 1.1e-8 and largest element
    difference 2.3e-4 / 3.9e-5 / 2.2e-8 for parameters / EMA copies / optimizer state), with a
    margin of about 4 for another CPU's summation order:
    """
    assert int(got.step) == int(want.step) == steps
    for field, rel_l2, largest in (
        ("params", 5e-5, LR * steps / 8),
        ("ema_params", 5e-6, 1.5e-4),
        ("opt_state", 5e-8, 1e-7),
    ):
        a, b = _leaves(getattr(got, field)), _leaves(getattr(want, field))
        diff = [x.astype(np.float64) - y for x, y in zip(a, b, strict=True)]
        norm = np.sqrt(sum(np.sum(y.astype(np.float64) ** 2) for y in b))
        assert np.sqrt(sum(np.sum(d**2) for d in diff)) <= rel_l2 * norm, field
        assert max(float(np.max(np.abs(d), initial=0)) for d in diff) <= largest, field
    np.testing.assert_array_equal(_leaves(got.sampler_state), _leaves(want.sampler_state))


def test_fsdp_steps_equal_the_replicated_steps(runs):
    fsdp, repl = runs["fsdp"]["result"], runs["replicated"]["result"]
    losses = [[h["loss"] for h in r["history"]] for r in (fsdp, repl)]
    # The forward pass reads the gathered parameters unchanged: losses agree to float32 rounding.
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    _assert_same_training(fsdp["state"], repl["state"], STEPS)


def test_an_fsdp_checkpoint_resumes_replicated_and_on_four_devices(runs, tmp_path):
    fsdp_dir, fsdp = runs["fsdp"]["workdir"], runs["fsdp"]["result"]["state"]
    # Step 2 of the FSDP run, resumed replicated on the 8 devices: the replicated run's steps.
    config = _config("replicated", resume_checkpoint=str(fsdp_dir / "checkpoints" / "2"))
    resumed, line = _train(config, tmp_path / "replicated")
    assert resumed["start_step"] == 2 and "state sharding replicated over 8" in line
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(resumed["state"]))
    _assert_same_training(resumed["state"], runs["replicated"]["result"]["state"], STEPS)
    # The finished FSDP run's workdir reopened under FSDP on 4 devices: its state bit for bit,
    # split four ways.
    shutil.copytree(fsdp_dir, tmp_path / "four")
    mesh = distributed.data_mesh(jax.devices()[:4])
    reopened, line = _train(_config("fsdp"), tmp_path / "four", mesh=mesh)
    assert reopened["start_step"] == STEPS and "fsdp over 4 device(s)" in line
    state = reopened["state"]
    kernel = state.opt_state.inner_state[0][0].mu["out_2"]["kernel"]  # [3, 3, 32, 6]
    assert kernel.sharding.mesh.size == 4 and kernel.sharding.spec == P(None, None, "data")
    for a, b in zip(_leaves(state), _leaves(fsdp), strict=True):
        np.testing.assert_array_equal(a, b)
    # Inference loading reads the sharded checkpoint whole.
    loaded = locate.load_params(fsdp_dir)
    for a, b in zip(_leaves(loaded), _leaves(fsdp.ema_params["0.99"]), strict=True):
        np.testing.assert_array_equal(a, b)
