"""Classifier-free guidance training (issue 25, the training part): `model.class_dropout`.

With class_dropout > 0 the UNet's label embedding has a null row (label num_classes) and the
diffusion trainer replaces each example's label by it with that probability, from a random stream
of its own; with 0 the network, the step and every record are exactly those of before the key.
"""

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from gdiff import distributed, errors, factory
from gdiff.checkpoints import locate, settings
from gdiff.models import unet
from gdiff.train import diffusion_trainer, optim
from gdiff.train import state as state_lib

EMB = 4 * 32  # tiny's time-embedding width: 4 x model.num_channels


def _config(class_dropout=None, **model):
    """tiny's config; class_dropout None: without the key (a config of before it existed)."""
    config = tiny.get_config()
    if class_dropout is None:
        if "class_dropout" in config.model:
            del config.model["class_dropout"]
    else:
        config.model.class_dropout = class_dropout
    for key, value in model.items():
        config.model[key] = value
    return config


def _label_rows(config) -> int:
    params = factory.abstract_variables(factory.build_model(config))["params"]
    return params["label_emb"]["embedding"].shape[0]


def test_the_label_embedding_has_a_null_row_only_with_dropout():
    chex.assert_shape(
        factory.abstract_variables(factory.build_model(_config(0.2)))["params"]["label_emb"][
            "embedding"
        ],
        (11, EMB),
    )
    assert _label_rows(_config(0.0)) == _label_rows(_config()) == 10
    assert _label_rows(_config(0.2, small_size=4)) == 11  # the super-resolution model too
    assert isinstance(factory.build_model(_config(0.2, small_size=4)), unet.SuperResModel)
    assert factory.null_label(_config(0.2).model) == 10
    assert factory.null_label(_config(0.0).model) is None
    assert factory.null_label(_config().model) is None
    # Without dropout: the very module of before (so converted checkpoints and parity hold).
    assert factory.build_model(_config(0.0)) == factory.build_model(_config())
    assert not factory.build_model(_config(0.0)).null_class


def test_the_null_label_conditions_otherwise_than_a_real_one():
    model = factory.build_model(_config(0.3))
    params = factory.init_variables(model, jax.random.key(0))["params"]
    # A fresh network outputs exactly 0 (zero-initialised output convolutions): perturb every
    # weight so that the label reaches the output.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    params = jax.tree.unflatten(tree, noisy)
    x = jnp.broadcast_to(jax.random.normal(jax.random.key(2), (1, 8, 8, 3)), (3, 8, 8, 3))
    t = jnp.full([3], 50.0)
    out = jax.jit(model.apply)({"params": params}, x, t, y=jnp.array([3, 10, 3]))
    chex.assert_shape(out, (3, 8, 8, 6))
    np.testing.assert_array_equal(out[0], out[2])
    assert float(jnp.abs(out[0] - out[1]).max()) > 1e-3


def test_drop_labels_fraction_determinism_and_kept_labels():
    labels = jnp.arange(10_000, dtype=jnp.int32) % 10
    key = jax.random.key(7)
    dropped = diffusion_trainer.drop_labels(labels, key, 0.2, 10)
    chex.assert_shape(dropped, (10_000,))
    assert dropped.dtype == labels.dtype
    is_null = np.asarray(dropped == 10)
    stderr = math.sqrt(0.2 * 0.8 / labels.size)
    assert abs(is_null.mean() - 0.2) < 4 * stderr, is_null.mean()
    np.testing.assert_array_equal(np.asarray(dropped)[~is_null], np.asarray(labels)[~is_null])
    again = diffusion_trainer.drop_labels(labels, key, 0.2, 10)
    np.testing.assert_array_equal(dropped, again)
    other = diffusion_trainer.drop_labels(labels, jax.random.key(8), 0.2, 10)
    assert (np.asarray(other) != np.asarray(dropped)).any()


def test_label_dropout_leaves_the_timesteps_and_the_noise_alone():
    batch = {"image": jnp.zeros([64, 8, 8, 3]), "label": jnp.arange(64, dtype=jnp.int32) % 10}
    key = jax.random.key(3)
    plain = diffusion_trainer.draw_inputs(batch, key)
    dropped = diffusion_trainer.draw_inputs(batch, key, class_dropout=0.5, null_label=10)
    np.testing.assert_array_equal(plain["u"], dropped["u"])
    np.testing.assert_array_equal(plain["noise"], dropped["noise"])
    np.testing.assert_array_equal(plain["y"], batch["label"])
    assert 0 < int((dropped["y"] == 10).sum()) < 64


def _two_steps(config):
    """The parameters after two training steps of `config` on one device (a fixed batch)."""
    mesh = distributed.data_mesh(jax.devices()[:1])
    task = diffusion_trainer.build_task(config, mesh)
    key = jax.random.key(config.seed)
    state = state_lib.create(
        task.init_params(key),
        optim.create_optimizer(config.optim),
        rng=key,
        ema_rates=task.ema_rates,
        sampler_state=task.sampler_state,
    )
    images = jax.random.uniform(jax.random.key(4), (16, 8, 8, 3), minval=-1.0, maxval=1.0)
    batch = {"image": images, "label": jnp.arange(16, dtype=jnp.int32) % 10}
    step = jax.jit(task.train_step)
    for _ in range(2):
        state, _ = step(state, batch)
    return jax.device_get(state.params)


def test_zero_dropout_trains_bitwise_as_before_the_key():
    got, before = _two_steps(_config(0.0)), _two_steps(_config())
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)


def test_zero_dropout_records_what_was_recorded_before_the_key():
    """The resume fingerprint, and a run manifest's model group, of class_dropout=0 are those of
    a config without the key: runs and checkpoints made before it still resume and load."""
    assert diffusion_trainer.fingerprint(_config(0.0)) == diffusion_trainer.fingerprint(_config())
    assert factory.recorded_model_group(_config(0.0).model) == _config().model.to_dict()
    assert factory.recorded_model_group(_config(0.2).model)["class_dropout"] == 0.2


def _differences(trained: dict, config) -> list[str]:
    return settings.differences(
        trained,
        network="model",
        config_network=config.model.to_dict(),
        diffusion=config.diffusion.to_dict(),
        image_size=8,
    )


def _recorded(config) -> dict:
    """The settings a training checkpoint of `config` records (gdiff_config.json, JSON values)."""
    return json.loads(json.dumps(diffusion_trainer.fingerprint(config)))


def test_settings_of_a_checkpoint_from_before_the_key_match_zero_dropout():
    before = _recorded(_config())  # its model group lacks class_dropout
    assert "class_dropout" not in before["model"]
    assert _differences(before, _config(0.0)) == []
    assert _differences(before, _config()) == []
    with_dropout = _recorded(_config(0.2))
    assert _differences(with_dropout, _config(0.0)) == [
        "model.class_dropout: trained 0.2, configured 0.0"
    ]


def test_a_short_run_records_the_dropout_and_trains_the_null_row(tmp_path):
    config = _config(0.2)
    config.train.num_steps = 2
    config.train.save_every = 2
    config.train.progress = False
    mesh = distributed.data_mesh(jax.devices()[:1])
    diffusion_trainer.train(config, str(tmp_path), mesh=mesh)
    trained = settings.recorded(locate.locate(tmp_path, "model"))
    assert trained["model"]["class_dropout"] == 0.2
    assert _differences(trained, config) == []
    params = locate.load_params(tmp_path)
    chex.assert_shape(params["label_emb"]["embedding"], (11, EMB))


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan"), 1.5])
def test_class_dropout_outside_zero_one_is_refused(value):
    mesh = distributed.data_mesh(jax.devices()[:1])
    with pytest.raises(errors.ConfigError, match=r"model\.class_dropout") as e:
        diffusion_trainer.build_task(_config(value), mesh)
    assert "\n" not in str(e.value)


def test_class_dropout_on_an_unconditional_model_is_refused():
    config = _config(0.2)
    config.data.class_cond = False
    mesh = distributed.data_mesh(jax.devices()[:1])
    with pytest.raises(errors.ConfigError, match=r"model\.class_dropout=0\.2 needs") as e:
        diffusion_trainer.build_task(config, mesh)
    assert "\n" not in str(e.value)
