"""Weights for the FID Inception-v3 from either published form.

* `convert_fid_inception_state_dict`: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or any
  state dict with its torchvision names; float16 or float32 values).
* `load_fid_inception_graph_def`: the ADM evaluator's own `classify_image_graph_def.pb`, read with
  a minimal protobuf wire-format decoder (GraphDef -> NodeDef -> AttrValue -> TensorProto) so no
  TensorFlow is needed. TF scopes map onto the same PyTorch names (table in `_tf_scope_table`).

Both return {"params": ..., "batch_stats": ...} for `create_fid_inception()`.
"""

from __future__ import annotations

import functools
import struct

import jax
import numpy as np

from gdiff.evaluation import inception

# ----------------------------------------------------------------------------- state dict


@functools.cache
def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """PyTorch state-dict key -> PyTorch shape, derived from the Flax module itself."""
    module = inception.create_fid_inception()
    shapes = jax.eval_shape(
        module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 299, 299, 3), np.float32)
    )
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        names = [p.key for p in path]
        collection, *mods, leaf_name = names
        prefix = ".".join(mods)
        if collection == "params" and leaf_name == "kernel" and mods[-1] == "conv":
            h, w, i, o = leaf.shape
            out[f"{prefix}.weight"] = (o, i, h, w)
        elif collection == "params" and leaf_name == "kernel":  # fc
            out[f"{prefix}.weight"] = tuple(reversed(leaf.shape))
        elif collection == "params":
            out[f"{prefix}.{'weight' if leaf_name == 'scale' else 'bias'}"] = leaf.shape
        else:
            out[f"{prefix}.{'running_mean' if leaf_name == 'mean' else 'running_var'}"] = leaf.shape
    return out


def _set(tree: dict, path: list[str], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def convert_fid_inception_state_dict(state_dict) -> dict:
    """pytorch-fid / torchvision FID-Inception names -> Flax variables.

    Args:
      state_dict: mapping of PyTorch names (e.g. `Mixed_6d.branch1x1.conv.weight`, `fc.bias`) to
        arrays (numpy or torch-like with `.numpy()`), float16 or float32. `num_batches_tracked`
        and the unused `AuxLogits.*` head are ignored.

    Returns:
      {"params": ..., "batch_stats": ...} in float32 (conv kernels HWIO, fc kernel [2048, 1008]).

    Raises:
      ValueError listing every missing, unexpected or mis-shaped key.
    """
    expected = _expected_shapes()
    given = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked") or key.startswith("AuxLogits."):
            continue
        key = key[len("param/") :] if key.startswith("param/") else key
        given[key] = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
    problems = [f"missing: {k} {expected[k]}" for k in expected if k not in given]
    problems += [f"unexpected: {k} {given[k].shape}" for k in given if k not in expected]
    problems += [
        f"shape mismatch: {k} got {given[k].shape}, want {expected[k]}"
        for k in given
        if k in expected and tuple(given[k].shape) != tuple(expected[k])
    ]
    if problems:
        raise ValueError(
            "FID Inception state dict does not match pytorch-fid's fid_inception_v3:\n  "
            + "\n  ".join(problems)
        )
    variables: dict = {"params": {}, "batch_stats": {}}
    for key, value in given.items():
        value = value.astype(np.float32)
        *mods, leaf = key.split(".")
        if mods == ["fc"]:
            _set(variables["params"], ["fc", "kernel" if leaf == "weight" else "bias"],
                 value.T if leaf == "weight" else value)  # fmt: skip
        elif leaf == "weight" and mods[-1] == "conv":
            _set(variables["params"], [*mods, "kernel"], value.transpose(2, 3, 1, 0))
        elif leaf in ("weight", "bias"):
            _set(variables["params"], [*mods, "scale" if leaf == "weight" else "bias"], value)
        else:
            _set(variables["batch_stats"], [*mods, "mean" if leaf == "running_mean" else "var"],
                 value)  # fmt: skip
    return variables


# ----------------------------------------------------------------------------- TF scope names


def _tf_scope_table() -> dict[str, str]:
    """PyTorch module path (a BasicConv2d) -> TF graph scope of the same conv."""
    table = {
        "Conv2d_1a_3x3": "conv",
        "Conv2d_2a_3x3": "conv_1",
        "Conv2d_2b_3x3": "conv_2",
        "Conv2d_3b_1x1": "conv_3",
        "Conv2d_4a_3x3": "conv_4",
    }

    def seq(scope, first_index=0):
        # TF names the convs of one tower conv, conv_1, conv_2, ...
        return lambda i: f"{scope}/conv" if i + first_index == 0 else f"{scope}/conv_{i}"

    def mixed(torch_name: str, tf: str, towers: dict[str, int]) -> None:
        # A Mixed block: a 1x1 branch, conv towers (tower, tower_1) and a pooled 1x1 projection.
        table[f"{torch_name}.branch1x1"] = f"{tf}/conv"
        for (branch, count), tower in zip(towers.items(), ("tower", "tower_1"), strict=True):
            for i in range(count):
                table[f"{torch_name}.{branch}_{i + 1}"] = seq(f"{tf}/{tower}")(i)
        table[f"{torch_name}.branch_pool"] = f"{tf}/tower_2/conv"

    for torch_name, tf in {
        "Mixed_5b": "mixed",
        "Mixed_5c": "mixed_1",
        "Mixed_5d": "mixed_2",
    }.items():
        mixed(torch_name, tf, {"branch5x5": 2, "branch3x3dbl": 3})
    table["Mixed_6a.branch3x3"] = "mixed_3/conv"
    for i in range(3):
        table[f"Mixed_6a.branch3x3dbl_{i + 1}"] = seq("mixed_3/tower")(i)
    for k, torch_name in enumerate(("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e")):
        mixed(torch_name, f"mixed_{k + 4}", {"branch7x7": 3, "branch7x7dbl": 5})
    for i in range(2):
        table[f"Mixed_7a.branch3x3_{i + 1}"] = seq("mixed_8/tower")(i)
    for i in range(4):
        table[f"Mixed_7a.branch7x7x3_{i + 1}"] = seq("mixed_8/tower_1")(i)
    for torch_name, tf in {"Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10"}.items():
        table[f"{torch_name}.branch1x1"] = f"{tf}/conv"
        table[f"{torch_name}.branch3x3_1"] = f"{tf}/tower/conv"
        table[f"{torch_name}.branch3x3_2a"] = f"{tf}/tower/mixed/conv"
        table[f"{torch_name}.branch3x3_2b"] = f"{tf}/tower/mixed/conv_1"
        table[f"{torch_name}.branch3x3dbl_1"] = f"{tf}/tower_1/conv"
        table[f"{torch_name}.branch3x3dbl_2"] = f"{tf}/tower_1/conv_1"
        table[f"{torch_name}.branch3x3dbl_3a"] = f"{tf}/tower_1/mixed/conv"
        table[f"{torch_name}.branch3x3dbl_3b"] = f"{tf}/tower_1/mixed/conv_1"
        table[f"{torch_name}.branch_pool"] = f"{tf}/tower_2/conv"
    return table


TF_SCOPES = _tf_scope_table()

# ----------------------------------------------------------------------------- protobuf decoding


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview):
    """Yields (field number, wire type, value) of one message; value is an int for varints and a
    memoryview of the payload for length-delimited and fixed-width fields."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {field})")
        yield field, wire, value


# TensorProto dtype enum -> numpy dtype (the ones a weight graph uses).
_TF_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 9: np.int64, 19: np.float16}
# TensorProto repeated-value fields: field number -> (enum dtypes it serves, packed element format)
_VALUE_FIELDS = {5: "f", 6: "d", 7: "i", 10: "q", 13: "i"}


def _decode_tensor(buf: memoryview) -> np.ndarray:
    dtype_enum, shape, content, values = None, [], None, []
    for field, wire, value in _fields(buf):
        if field == 1:
            dtype_enum = value
        elif field == 2:  # TensorShapeProto: repeated Dim dim = 2 {int64 size = 1}
            for f2, _, dim in _fields(value):
                if f2 == 2:
                    size = next((v for f3, _, v in _fields(dim) if f3 == 1), 0)
                    shape.append(size - (1 << 64) if size >= 1 << 63 else size)
        elif field == 4:
            content = bytes(value)
        elif field in _VALUE_FIELDS:
            fmt = _VALUE_FIELDS[field]
            if wire == 2 and fmt in "fd":  # packed fixed-width floats
                values.extend(struct.unpack(f"<{len(value) // struct.calcsize(fmt)}{fmt}", value))
            elif wire == 2:  # packed varints
                pos, raw = 0, value
                while pos < len(raw):
                    v, pos = _varint(raw, pos)
                    values.append(v)
            elif wire == 0:
                values.append(value)
            else:
                values.append(struct.unpack(f"<{fmt}", value)[0])
    if dtype_enum not in _TF_DTYPES:
        raise ValueError(f"unsupported TensorProto dtype enum {dtype_enum}")
    dtype = np.dtype(_TF_DTYPES[dtype_enum])
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        return np.frombuffer(content, dtype=dtype).reshape(shape).copy()
    if dtype_enum == 19:  # half_val holds the float16 bit patterns as int32
        arr = np.asarray(values, np.uint16).view(np.float16)
    else:
        arr = np.asarray(values, dtype)
    if arr.size == count:
        return arr.reshape(shape)
    if arr.size == 1 or (arr.size == 0 and count > 0):  # TF repeats the last value to fill
        return np.full(shape, arr[-1] if arr.size else 0, dtype)
    raise ValueError(f"TensorProto holds {arr.size} values for shape {shape}")


def _decode_attr(buf: memoryview):
    for field, _, value in _fields(buf):
        if field == 8:
            return _decode_tensor(value)
        if field == 4:
            return struct.unpack("<f", value)[0]
        if field in (3, 5, 6):
            return value
        if field == 2:
            return bytes(value).decode("utf-8", "replace")
    return None


def read_graph_def_nodes(data: bytes) -> dict[str, dict]:
    """Decodes a serialized GraphDef into {node name: {"op": str, "attr": {name: value}}}.

    Attribute values are numpy arrays for tensors, floats, ints/bools, or strings.
    """
    nodes = {}
    for field, _, node_buf in _fields(memoryview(data)):
        if field != 1:  # GraphDef.node
            continue
        name, op, attrs = "", "", {}
        for f, _, value in _fields(node_buf):
            if f == 1:
                name = bytes(value).decode()
            elif f == 2:
                op = bytes(value).decode()
            elif f == 5:  # map<string, AttrValue> entry
                key, attr = "", None
                for f2, _, v2 in _fields(value):
                    if f2 == 1:
                        key = bytes(v2).decode()
                    elif f2 == 2:
                        attr = _decode_attr(v2)
                attrs[key] = attr
        nodes[name] = {"op": op, "attr": attrs}
    return nodes


def graph_def_state_dict(nodes: dict[str, dict]) -> dict[str, np.ndarray]:
    """Maps the Inception GraphDef's constants onto pytorch-fid state-dict names."""

    def const(name):
        if name not in nodes or not isinstance(nodes[name]["attr"].get("value"), np.ndarray):
            raise ValueError(f"Inception GraphDef has no constant {name!r}")
        return nodes[name]["attr"]["value"].astype(np.float32)

    state = {}
    for torch_name, scope in TF_SCOPES.items():
        kernel = const(f"{scope}/conv2d_params")  # HWIO
        state[f"{torch_name}.conv.weight"] = kernel.transpose(3, 2, 0, 1)
        bn = f"{scope}/batchnorm"
        gamma = const(f"{bn}/gamma")
        var = const(f"{bn}/moving_variance")
        attrs = nodes.get(bn, {}).get("attr", {})
        if attrs.get("scale_after_normalization", 1) == 0:
            gamma = np.ones_like(gamma)  # the graph's BN ignores gamma in this mode
        eps = attrs.get("variance_epsilon")
        if eps is not None and abs(eps - inception.BN_EPS) > 1e-6 * inception.BN_EPS:
            # The Flax module hard-codes eps=1e-3; fold a different graph epsilon into the variance.
            var = (var + np.float32(eps) - np.float32(inception.BN_EPS)).astype(np.float32)
        state[f"{torch_name}.bn.weight"] = gamma
        state[f"{torch_name}.bn.bias"] = const(f"{bn}/beta")
        state[f"{torch_name}.bn.running_mean"] = const(f"{bn}/moving_mean")
        state[f"{torch_name}.bn.running_var"] = var
    state["fc.weight"] = const("softmax/weights").T
    state["fc.bias"] = const("softmax/biases")
    return state


def load_fid_inception_graph_def(path) -> dict:
    """Reads the ADM evaluator's `classify_image_graph_def.pb` into FID-Inception variables.

    Args:
      path: the 2015-12-05 Inception GraphDef (binary protobuf).

    Returns:
      {"params", "batch_stats"} as `convert_fid_inception_state_dict` gives.
    """
    with open(path, "rb") as f:
        data = f.read()
    return convert_fid_inception_state_dict(graph_def_state_dict(read_graph_def_nodes(data)))
