"""Checkpoint round trips, config fingerprints, and never overwriting a finished file."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from gdiff import distributed, errors
from gdiff.checkpoints import locate, store


@struct.dataclass
class _State:
    step: jax.Array
    params: dict
    ema_params: dict
    opt_state: tuple
    rng: jax.Array


def _state(step: int, value: float) -> _State:
    return _State(
        step=jnp.asarray(step),
        params={"dense": {"kernel": jnp.full((3, 2), value)}},
        ema_params={
            "0.9999": {"dense": {"kernel": jnp.full((3, 2), value + 1)}},
            "0.5": {"dense": {"kernel": jnp.full((3, 2), value + 2)}},
        },
        opt_state=({"mu": jnp.arange(6.0).reshape(3, 2) * value},),
        rng=jax.random.key_data(jax.random.key(step)),
    )


def test_keep_every_keeps_a_series_beyond_max_to_keep(tmp_path):
    manager = store.CheckpointManager(tmp_path / "c", max_to_keep=1, keep_every=2)
    for step in range(1, 8):
        assert manager.save(step, _state(step, float(step)))
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 4, 6, 7]  # every 2nd step, and the newest
    manager.close()
    with pytest.raises(errors.ConfigError, match="train.keep_every=-1"):
        store.CheckpointManager(tmp_path / "d", keep_every=-1)


def test_training_checkpoint_round_trip_and_retention(tmp_path):
    manager = store.CheckpointManager(
        tmp_path / "checkpoints", max_to_keep=2, config_fingerprint={"model": {"width": 8}}
    )
    for step in (1, 2, 3):
        assert manager.save(step, _state(step, float(step)))
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 3]
    abstract = jax.eval_shape(lambda: _state(0, 0.0))
    restored = manager.restore(abstract)
    manager.close()
    assert int(restored.step) == 3
    np.testing.assert_array_equal(restored.opt_state[0]["mu"], np.arange(6.0).reshape(3, 2) * 3)
    np.testing.assert_array_equal(restored.rng, jax.random.key_data(jax.random.key(3)))


def test_restore_onto_a_mesh_keeps_the_requested_sharding(tmp_path):
    manager = store.CheckpointManager(tmp_path / "c")
    manager.save(5, _state(5, 1.0))
    manager.wait_until_finished()
    mesh = distributed.data_mesh()
    abstract = jax.eval_shape(lambda: _state(0, 0.0))
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=distributed.replicated(mesh)),
        abstract,
    )
    restored = manager.restore(abstract)
    manager.close()
    kernel = restored.params["dense"]["kernel"]
    assert kernel.sharding.is_equivalent_to(distributed.replicated(mesh), kernel.ndim)
    assert len(kernel.sharding.device_set) == jax.device_count()


def test_another_config_is_refused_with_the_differing_keys(tmp_path):
    directory = tmp_path / "checkpoints"
    manager = store.CheckpointManager(
        directory, config_fingerprint={"model": {"width": 8, "depth": 2}}
    )
    manager.save(1, _state(1, 1.0))
    manager.close()
    with pytest.raises(ValueError, match=r"model\.width: checkpoint 8 vs this run 16"):
        store.CheckpointManager(directory, config_fingerprint={"model": {"width": 16, "depth": 2}})
    # The refusal happened before anything was written.
    assert json.loads((directory / store.CONFIG_FILE).read_text())["model"]["width"] == 8
    assert store.CheckpointManager(directory).latest_step() == 1


def test_load_params_picks_ema_rates_from_a_workdir(tmp_path):
    manager = store.CheckpointManager(tmp_path / "checkpoints")
    manager.save(7, _state(7, 10.0))
    manager.close()
    slowest = locate.load_params(tmp_path)
    np.testing.assert_array_equal(slowest["dense"]["kernel"], np.full((3, 2), 11.0))
    fast = locate.load_params(tmp_path / "checkpoints", ema_rate=0.5)
    np.testing.assert_array_equal(fast["dense"]["kernel"], np.full((3, 2), 12.0))
    one_step = locate.load_params(tmp_path / "checkpoints" / "7", ema_rate="0.9999")
    np.testing.assert_array_equal(one_step["dense"]["kernel"], np.full((3, 2), 11.0))
    with pytest.raises(KeyError, match="0.25"):
        locate.load_params(tmp_path, ema_rate=0.25)


def test_params_checkpoint_is_atomic_and_never_overwritten(tmp_path):
    params = {"conv": {"kernel": np.arange(8.0, dtype=np.float32).reshape(2, 2, 2)}}
    target = tmp_path / "model_params"
    store.save_params(target, params, metadata={"source": "test.pt"})
    assert store.read_metadata(target) == {"kind": "params", "source": "test.pt"}
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        store.save_params(target, {"conv": {"kernel": np.zeros(3)}})
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary left behind
    loaded = locate.load_params(tmp_path)  # found through the workdir layout
    np.testing.assert_array_equal(loaded["conv"]["kernel"], params["conv"]["kernel"])
    store.save_params(target, {"conv": {"kernel": np.ones(3)}}, overwrite=True)
    np.testing.assert_array_equal(locate.load_params(target)["conv"]["kernel"], np.ones(3))


def test_missing_checkpoints_name_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        locate.load_params(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="classifier_checkpoints"):
        locate.load_params(tmp_path, kind="classifier")


def test_locate_finds_params_training_dirs_step_folders_and_workdirs(tmp_path):
    params = tmp_path / "model_params"
    params.mkdir()
    (params / store.METADATA_FILE).write_text("{}")
    train = tmp_path / "checkpoints"
    # Orbax writes a step under a temporary name and renames it when complete.
    for name in ("3", "12", "20.orbax-checkpoint-tmp-1"):
        (train / name).mkdir(parents=True)
    find, Location = locate.locate, locate.Location
    assert find(params) == Location(params, "params", None)
    assert find(train) == Location(train, "training", 12)
    assert find(train / "3") == Location(train, "training", 3)
    # A workdir: WORKDIR_LAYOUT order, the training directory first.
    assert find(tmp_path, "model") == Location(train, "training", 12)
    for name in ("3", "12"):
        (train / name).rmdir()
    assert find(tmp_path, "model") == Location(params, "params", None)


def test_locate_names_what_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        locate.locate(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*expected a parameter"):
        locate.locate(tmp_path)  # a workdir is looked into only for a kind
    train = tmp_path / "classifier_checkpoints"
    (train / "5.orbax-checkpoint-tmp-9").mkdir(parents=True)
    (train / store.CONFIG_FILE).write_text("{}")
    with pytest.raises(FileNotFoundError, match="training checkpoint directory with no finished"):
        locate.locate(train)
    with pytest.raises(
        FileNotFoundError,
        match=r"no classifier checkpoint .* classifier_params \(.*classifier_checkpoints is a "
        "training checkpoint directory with no finished step yet\\)",
    ):
        locate.locate(tmp_path, "classifier")
    with pytest.raises(ValueError, match="kind must be one of"):
        locate.locate(tmp_path, "vae")


def test_load_params_takes_a_location(tmp_path):
    manager = store.CheckpointManager(tmp_path / "c", max_to_keep=2)
    for step in (1, 2):
        manager.save(step, _state(step, float(step)))
    manager.close()
    older = locate.locate(tmp_path / "c" / "1")
    params = locate.load_params(older, ema_rate=0.5)
    np.testing.assert_array_equal(params["dense"]["kernel"], np.full((3, 2), 3.0))


def test_batches_must_divide_over_devices():
    n = jax.device_count()
    distributed.check_batch_divisible(2 * n)
    with pytest.raises(ValueError, match=rf"train.batch_size={n + 1} .* devices \({n}\)"):
        distributed.check_batch_divisible(n + 1)


def test_global_batch_shards_the_leading_axis():
    mesh = distributed.data_mesh()
    local = np.arange(2 * jax.device_count() * 3, dtype=np.float32).reshape(-1, 3)
    arr = distributed.global_batch({"x": local}, mesh)["x"]
    assert arr.shape == local.shape
    assert len(arr.addressable_shards) == jax.device_count()
    np.testing.assert_array_equal(distributed.to_host(arr), local)
    assert distributed.local_batch_size(16, mesh) == 16
