"""convert_state_dict: reference names -> Flax variables, with one complete error report."""

import json

import jax
import numpy as np
import pytest
from conftest import fixture_path, load_fixture

from gdiff.compat import convert, openai


def _legacy():
    z = load_fixture("unet_small_legacy.npz")
    cfg = json.loads(str(z["config_json"]))["create_model"]
    sd = {k[len("param/") :]: z[k] for k in z.files if k.startswith("param/")}
    return cfg, sd


def test_reference_names_and_layouts():
    assert convert.reference_name(("input_blocks_10_1", "qkv", "kernel")) == (
        "input_blocks.10.1.qkv.weight"
    )
    assert convert.reference_name(("out_0", "scale")) == "out.0.weight"
    assert convert.reference_name(("label_emb", "embedding")) == "label_emb.weight"
    cfg, sd = _legacy()
    params = openai.convert_state_dict(openai.create_model(**cfg), sd)["params"]
    w = sd["input_blocks.0.0.weight"]  # OIHW
    np.testing.assert_array_equal(params["input_blocks_0_0"]["kernel"], w.transpose(2, 3, 1, 0))
    qkv = sd["middle_block.1.qkv.weight"]  # Conv1d (out, in, 1)
    np.testing.assert_array_equal(params["middle_block_1"]["qkv"]["kernel"], qkv[:, :, 0].T)
    lin = sd["time_embed.0.weight"]  # Linear (out, in)
    np.testing.assert_array_equal(params["time_embed_0"]["kernel"], lin.T)


def test_wrong_config_lists_every_offending_layer_with_both_shapes():
    cfg, sd = _legacy()
    wider = openai.create_model(**{**cfg, "num_channels": 64})
    with pytest.raises(ValueError) as e:
        openai.convert_state_dict(wider, sd)
    msg = str(e.value)
    assert (
        "input_blocks.0.0.weight: checkpoint has (32, 3, 3, 3), model expects (64, 3, 3, 3)" in msg
    )
    assert "time_embed.0.weight: checkpoint has (128, 32), model expects (256, 64)" in msg
    assert "out.2.weight" in msg


def test_missing_and_unexpected_keys_are_reported_together():
    cfg, sd = _legacy()
    broken = dict(sd)
    del broken["out.2.bias"]
    broken["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as e:
        openai.convert_state_dict(openai.create_model(**cfg), broken)
    msg = str(e.value)
    assert "missing from the checkpoint" in msg and "out.2.bias: model expects (3,)" in msg
    assert "unexpected in the checkpoint" in msg and "extra.weight: (3,)" in msg


def test_float16_checkpoint_is_cast_to_float32():
    cfg, sd = _legacy()
    half = {k: v.astype(np.float16) for k, v in sd.items()}
    params = openai.convert_state_dict(openai.create_model(**cfg), half)["params"]
    leaves = jax.tree.leaves(params)
    assert all(p.dtype == np.float32 for p in leaves)
    # Fixture values are multiples of 2^-10 in a small range: float16 holds them exactly.
    np.testing.assert_array_equal(params["out_2"]["bias"], sd["out.2.bias"])


def test_convert_mode_writes_a_loadable_parameter_checkpoint(tmp_path):
    from configs import common
    from gdiff.checkpoints import locate, store
    from gdiff.compat import flags
    from gdiff.jobs import convert as convert_checkpoint

    cfg, sd = _legacy()
    config = common.get_config()
    flags.write_config(config, cfg)
    config.torch_checkpoint = str(fixture_path("unet_small_legacy.pt"))
    out = convert_checkpoint.run(config, tmp_path)
    assert out == tmp_path / "model_params"
    params = locate.load_params(out)
    np.testing.assert_array_equal(
        np.asarray(params["input_blocks_0_0"]["kernel"]),
        sd["input_blocks.0.0.weight"].transpose(2, 3, 1, 0),
    )
    assert store.read_metadata(out)["num_params"] == sum(v.size for v in sd.values())
    # A second conversion refuses to replace the finished one, naming the flag that allows it.
    stamp = (out / store.METADATA_FILE).stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="--config.convert_overwrite=true"):
        convert_checkpoint.run(config, tmp_path)
    assert (out / store.METADATA_FILE).stat().st_mtime_ns == stamp
    config.convert_overwrite = True
    assert convert_checkpoint.run(config, tmp_path) == out
