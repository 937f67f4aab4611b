"""FID Inception-v3 parity (random-weight fixture), resizes, and the two weight readers."""

import json
import struct

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import load_fixture, rel_l2

from gdiff.evaluation import features, inception, inception_weights, resize

OUT_KEYS = ("pool_3", "spatial", "logits", "logits_nobias")


@pytest.fixture(scope="module")
def fid():
    z = load_fixture("inception_fid.npz")
    data = {k: z[k] for k in z.files}
    state = {k[len("param/") :]: v for k, v in data.items() if k.startswith("param/")}
    return data, state, json.loads(str(z["config_json"]))


@pytest.fixture(scope="module")
def variables(fid):
    return inception_weights.convert_fid_inception_state_dict(fid[1])


# ----------------------------------------------------------------------------- resize


def test_resizes_match_fixture(fid):
    data, _, cfg = fid
    x = data["images_uint8"].astype(np.float32)
    out_hw = tuple(cfg["resize_out_hw"])
    for name in ("legacy", "halfpixel"):
        got = (resize.RESIZERS[name](x, out_hw) - 128.0) * 0.0078125
        assert rel_l2(got, data[f"resized_{name}"]) <= 1e-6, name
    legacy = np.asarray(resize.resize_bilinear_legacy(x, out_hw))
    # The legacy grid starts exactly on input pixel 0.
    np.testing.assert_array_equal(legacy[:, 0, 0], x[:, 0, 0])


def test_resizes_match_tensorflow():
    import tensorflow as tf  # a requirement: a missing install fails, not skips

    rng = np.random.default_rng(0)
    for in_hw, out_hw in (((13, 17), (29, 31)), ((64, 48), (20, 30)), ((8, 8), (37, 29))):
        x = rng.uniform(0, 255, size=(2, *in_hw, 3)).astype(np.float32)
        want = tf.compat.v1.image.resize_bilinear(x, out_hw, align_corners=False).numpy()
        got = np.asarray(resize.resize_bilinear_legacy(x, out_hw))
        assert rel_l2(got, want) <= 1e-6, (in_hw, out_hw)
        want = tf.image.resize(x, out_hw, method="bilinear", antialias=False).numpy()
        got = np.asarray(resize.resize_bilinear_halfpixel(x, out_hw))
        assert rel_l2(got, want) <= 1e-6, (in_hw, out_hw)


# ----------------------------------------------------------------------------- network


def test_forward_matches_fixture_with_debug_blocks(fid, variables):
    data, _, _ = fid
    n = data["images_uint8"].shape[0]
    module = inception.create_fid_inception()
    x = np.concatenate([data["resized_legacy"], data["resized_halfpixel"]])
    out = jax.jit(lambda v, x: module.apply(v, x, return_debug=True))(variables, x)
    out = jax.tree.map(np.asarray, out)
    for suffix, rows in (("", slice(0, n)), ("_halfpixel", slice(n, 2 * n))):
        for key in OUT_KEYS:
            assert rel_l2(out[key][rows], data[key + suffix]) <= 1e-4, key + suffix
        for block in inception.block_names():
            act = out["debug"][block][rows]
            err_mean = rel_l2(act.mean(axis=(1, 2)), data[f"debug/{block}/mean{suffix}"])
            err_corner = rel_l2(act[:, :3, :3], data[f"debug/{block}/corner{suffix}"])
            assert max(err_mean, err_corner) <= 1e-4, (block, suffix, err_mean, err_corner)
    assert out["spatial"].shape == (2 * n, 17 * 17 * 7)
    assert out["logits"].shape == (2 * n, inception.NUM_CLASSES)


def test_end_to_end_from_uint8(fid, variables):
    data, _, _ = fid
    images = data["images_uint8"]
    module = inception.create_fid_inception()
    out = features.fid_inception_features(module, variables, images)  # legacy resize
    assert rel_l2(out["pool_3"], data["pool_3"]) <= 1e-4
    assert rel_l2(out["spatial"], data["spatial"]) <= 1e-4
    assert rel_l2(out["logits"], data["logits_nobias"]) <= 1e-4
    # The half-pixel network input, end to end up to the (already tested) network.
    x = features.preprocess_for_inception(images, resize="halfpixel")
    assert rel_l2(x, data["resized_halfpixel"]) <= 1e-6
    with pytest.raises(ValueError, match="uint8"):
        features.fid_inception_features(module, variables, images.astype(np.float32))
    with pytest.raises(ValueError, match="resize"):
        features.fid_inception_features(module, variables, images, resize="bicubic")


class _TinyInception(nn.Module):
    """Stands in for the 2015 graph (same outputs) to test the sharded extractor cheaply."""

    @nn.compact
    def __call__(self, x):
        pooled = x.mean(axis=(1, 2))  # [N, 3]
        logits = nn.Dense(5, name="fc")(pooled)
        return {
            "pool_3": pooled,
            "spatial": x[:, ::100, ::100, :].reshape(x.shape[0], -1),
            "logits": logits,
            "logits_nobias": logits - self.variables["params"]["fc"]["bias"],
        }


def test_inception_extractor_shards_and_pads(fid):
    data, _, _ = fid
    images = np.concatenate([data["images_uint8"]] * 3)[:11]  # 11 images, batches of 8
    module = _TinyInception()
    variables = module.init(jax.random.key(0), np.zeros((1, 299, 299, 3), np.float32))
    ext = features.InceptionExtractor(variables, batch_size=5, module=module)
    assert ext.batch_size == jax.device_count()  # rounded up to a multiple of the devices
    got = ext(images)
    x = np.asarray(features.preprocess_for_inception(images))
    want = module.apply(variables, x)
    # Means over 299x299 pixels: summation order differs between the sharded and plain runs.
    np.testing.assert_allclose(got["pool"], want["pool_3"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["spatial"], want["spatial"], rtol=1e-6, atol=1e-6)
    probs = jax.nn.softmax(want["logits_nobias"], axis=-1)
    np.testing.assert_allclose(got["probs"], probs, rtol=1e-4, atol=1e-6)
    assert got["pool"].shape == (11, 3)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        ext(images[..., :1])


# ----------------------------------------------------------------------------- state dict


def test_state_dict_dtypes_and_errors(fid, variables):
    _, state, _ = fid
    as32 = inception_weights.convert_fid_inception_state_dict(
        {k: v.astype(np.float32) for k, v in state.items()}
    )
    jax.tree.map(np.testing.assert_array_equal, as32, variables)
    kernel = variables["params"]["Mixed_6d"]["branch1x1"]["conv"]["kernel"]
    want = state["Mixed_6d.branch1x1.conv.weight"].astype(np.float32).transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(kernel, want)
    assert kernel.dtype == np.float32
    bad = dict(state)
    del bad["Mixed_7c.branch_pool.bn.running_var"]
    bad["Mixed_7c.extra.weight"] = np.zeros(3)
    bad["fc.bias"] = np.zeros(1000)
    with pytest.raises(ValueError) as err:
        inception_weights.convert_fid_inception_state_dict(bad)
    msg = str(err.value)
    assert "missing: Mixed_7c.branch_pool.bn.running_var" in msg
    assert "unexpected: Mixed_7c.extra.weight" in msg
    assert "fc.bias got (1000,), want (1008,)" in msg


# ----------------------------------------------------------------------------- GraphDef


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        byte, v = v & 0x7F, v >> 7
        out.append(byte | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:  # length-delimited
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _tensor(arr: np.ndarray, mode: str) -> bytes:
    dtype = {np.dtype(np.float32): 1, np.dtype(np.float16): 19}[arr.dtype]
    shape = b"".join(_field(2, _varint(1 << 3) + _varint(d)) for d in arr.shape)
    msg = _varint(1 << 3) + _varint(dtype) + _field(2, shape)
    if mode == "content":
        return msg + _field(4, arr.tobytes())
    if mode == "float_val":  # packed repeated float
        return msg + _field(5, struct.pack(f"<{arr.size}f", *arr.ravel().tolist()))
    bits = arr.ravel().view(np.uint16).tolist()  # half_val: packed varints of the bit patterns
    return msg + _field(13, b"".join(_varint(b) for b in bits))


def _node(name: str, op: str, attrs: dict[str, bytes]) -> bytes:
    body = _field(1, name.encode()) + _field(2, op.encode())
    for key, value in attrs.items():
        body += _field(5, _field(1, key.encode()) + _field(2, value))
    return _field(1, body)


def _tf_state(state):
    """The fixture's weights under the TF graph's names and layouts."""
    out = {}
    for torch_name, scope in inception_weights.TF_SCOPES.items():
        out[f"{scope}/conv2d_params"] = state[f"{torch_name}.conv.weight"].transpose(2, 3, 1, 0)
        for tf_leaf, leaf in (("gamma", "weight"), ("beta", "bias")):
            out[f"{scope}/batchnorm/{tf_leaf}"] = state[f"{torch_name}.bn.{leaf}"]
        out[f"{scope}/batchnorm/moving_mean"] = state[f"{torch_name}.bn.running_mean"]
        out[f"{scope}/batchnorm/moving_variance"] = state[f"{torch_name}.bn.running_var"]
    out["softmax/weights"] = state["fc.weight"].T
    out["softmax/biases"] = state["fc.bias"]
    return out


def test_graph_def_reader_own_encoder(fid, variables, tmp_path):
    _, state, _ = fid
    parts = []
    for i, (name, arr) in enumerate(_tf_state(state).items()):
        arr = np.ascontiguousarray(arr)
        if name.endswith("conv2d_params"):
            blob = _tensor(arr.astype(np.float32), "content")
        elif name == "softmax/weights":
            blob = _tensor(arr.astype(np.float16), "content")
        else:
            blob = (
                _tensor(arr, "half_val") if i % 2 else _tensor(arr.astype(np.float32), "float_val")
            )
        dtype_attr = _varint(6 << 3) + _varint(1)
        parts.append(_node(name, "Const", {"dtype": dtype_attr, "value": _field(8, blob)}))
    for scope in inception_weights.TF_SCOPES.values():
        eps = _varint(4 << 3 | 5) + struct.pack("<f", 0.001)
        scale = _varint(5 << 3) + _varint(1)
        attrs = {"variance_epsilon": eps, "scale_after_normalization": scale}
        parts.append(_node(f"{scope}/batchnorm", "BatchNormWithGlobalNormalization", attrs))
    path = tmp_path / "inception.pb"
    path.write_bytes(b"".join(parts))
    got = inception_weights.load_fid_inception_graph_def(path)
    jax.tree.map(np.testing.assert_array_equal, got, variables)


def test_graph_def_reader_tensorflow_written(fid, variables, tmp_path):
    import tensorflow as tf  # a requirement: a missing install fails, not skips

    _, state, _ = fid
    graph = tf.compat.v1.GraphDef()
    for name, arr in _tf_state(state).items():
        node = graph.node.add()
        node.name, node.op = name, "Const"
        node.attr["dtype"].type = tf.float16.as_datatype_enum
        node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.ascontiguousarray(arr)))
    for scope in list(inception_weights.TF_SCOPES.values())[:3]:
        node = graph.node.add()
        node.name, node.op = f"{scope}/batchnorm", "BatchNormWithGlobalNormalization"
        node.attr["variance_epsilon"].f = 0.001
        node.attr["scale_after_normalization"].b = True
    path = tmp_path / "classify_image_graph_def.pb"
    path.write_bytes(graph.SerializeToString())
    got = inception_weights.load_fid_inception_graph_def(path)
    jax.tree.map(np.testing.assert_array_equal, got, variables)
    missing = tmp_path / "empty.pb"
    missing.write_bytes(b"")
    with pytest.raises(ValueError, match="conv/conv2d_params"):
        inception_weights.load_fid_inception_graph_def(missing)
