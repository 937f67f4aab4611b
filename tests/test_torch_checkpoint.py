"""load_torch_state_dict: a torch.save zip reader that never imports torch nor runs the pickle."""

import io
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest
from conftest import fixture_path, load_fixture

from gdiff.checkpoints.torch_file import load_torch_state_dict


def test_released_format_file_equals_fixture_bit_for_bit():
    z = load_fixture("unet_small_legacy.npz")
    sd = load_torch_state_dict(fixture_path("unet_small_legacy.pt"))
    want = {k[len("param/") :]: z[k] for k in z.files if k.startswith("param/")}
    assert sorted(sd) == sorted(want)
    for k, v in want.items():
        assert sd[k].dtype == v.dtype and sd[k].shape == v.shape, k
        assert sd[k].tobytes() == v.tobytes(), k
    assert "torch" not in sys.modules


def _write_archive(path, pickled: bytes, records: dict, byteorder="little", top="archive"):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{top}/data.pkl", pickled)
        zf.writestr(f"{top}/byteorder", byteorder)
        for key, raw in records.items():
            zf.writestr(f"{top}/data/{key}", raw)


def _fake_torch_pickle(entries, legacy=False) -> bytes:
    """Pickles {name: (storage_cls, key, numel, offset, size, stride[, view])} the way torch.save
    does, using stand-in modules named torch / torch._utils (removed again afterwards). `legacy`
    adds the legacy format's sixth persistent-id field: view metadata (view key, offset, size)
    or None."""
    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while pickling")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    classes = {}
    for name in ("FloatStorage", "HalfStorage"):
        classes[name] = type(name, (), {"__module__": "torch", "__qualname__": name})
        setattr(torch_mod, name, classes[name])

    class Tensor:
        def __init__(self, spec):
            self.spec = spec

        def __reduce__(self):
            cls, key, numel, offset, size, stride = self.spec[:6]
            view = self.spec[6] if len(self.spec) > 6 else None
            storage = Storage(cls, key, numel, view)
            return (_rebuild_tensor_v2, (storage, offset, size, stride, False))

    class Storage:
        def __init__(self, cls, key, numel, view):
            self.pid = ("storage", classes[cls], key, "cpu", numel) + ((view,) if legacy else ())

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return obj.pid if isinstance(obj, Storage) else None

    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = torch_mod, utils_mod
    try:
        buf = io.BytesIO()
        P(buf, protocol=2).dump({k: Tensor(v) for k, v in entries.items()})
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return buf.getvalue()


def test_strides_offsets_half_precision_and_big_endian(tmp_path):
    base = np.arange(12, dtype=np.float32)
    half = np.arange(6, dtype=np.float16) / 4
    pickled = _fake_torch_pickle(
        {
            "t": ("FloatStorage", "0", 12, 0, (3, 4), (4, 1)),
            "transposed": ("FloatStorage", "0", 12, 0, (4, 3), (1, 4)),  # a view, shared storage
            "offset": ("FloatStorage", "0", 12, 5, (2,), (3,)),
            "half": ("HalfStorage", "1", 6, 0, (2, 3), (3, 1)),
        }
    )
    path = tmp_path / "big.pt"
    _write_archive(
        path,
        pickled,
        {"0": base.astype(">f4").tobytes(), "1": half.astype(">f2").tobytes()},
        byteorder="big",
        top="some_other_name",
    )
    sd = load_torch_state_dict(path)
    np.testing.assert_array_equal(sd["t"], base.reshape(3, 4))
    np.testing.assert_array_equal(sd["transposed"], base.reshape(3, 4).T)
    np.testing.assert_array_equal(sd["offset"], [5.0, 8.0])
    assert sd["half"].dtype == np.float16
    np.testing.assert_array_equal(sd["half"], half.reshape(2, 3))


def test_pickle_naming_other_globals_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    path = tmp_path / "evil.pt"
    _write_archive(path, evil, {})
    with pytest.raises(ValueError, match=r"os\.system"):
        load_torch_state_dict(path)
    assert not marker.exists()


def test_truncated_and_non_zip_files_raise_clear_errors(tmp_path):
    data = (fixture_path("unet_small_legacy.pt")).read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="zip"):
        load_torch_state_dict(truncated)
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="zip"):
        load_torch_state_dict(text)


def test_storage_shorter_than_declared_is_corrupt(tmp_path):
    pickled = _fake_torch_pickle({"t": ("FloatStorage", "0", 12, 0, (3, 4), (4, 1))})
    path = tmp_path / "short.pt"
    _write_archive(path, pickled, {"0": np.zeros(5, np.float32).tobytes()})
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_torch_state_dict(path)


_LEGACY_MAGIC, _LEGACY_VERSION = 0x1950A86A20F9469CFC6C, 1001


def _legacy_bytes(pickled: bytes, storages: dict[str, np.ndarray]) -> bytes:
    """A legacy torch.save stream: three header pickles, the state dict pickle, the storage key
    list, then each storage as an int64 element count and its little-endian bytes."""
    out = io.BytesIO()
    sys_info = {"protocol_version": _LEGACY_VERSION, "little_endian": True, "type_sizes": {}}
    for header in (_LEGACY_MAGIC, _LEGACY_VERSION, sys_info):
        pickle.dump(header, out, protocol=2)
    out.write(pickled)
    pickle.dump(list(storages), out, protocol=2)
    for flat in storages.values():
        out.write(flat.size.to_bytes(8, "little"))
        out.write(flat.astype(flat.dtype.newbyteorder("<")).tobytes())
    return out.getvalue()


def _legacy_example():
    rng = np.random.default_rng(0)
    # Random bit patterns (NaN payloads, subnormals, -0 included) so equality is bit for bit.
    floats = rng.integers(0, 2**32, 20, dtype=np.uint32).view(np.float32)
    halves = rng.integers(0, 2**16, 6, dtype=np.uint16).view(np.float16)
    pickled = _fake_torch_pickle(
        {
            "w": ("FloatStorage", "0", 20, 0, (4, 5), (5, 1), None),
            "w_t": ("FloatStorage", "0", 20, 0, (5, 4), (1, 5), None),  # shares storage "0"
            "strided": ("FloatStorage", "0", 20, 3, (2, 3), (7, 2), None),
            # A tensor on a view of storage "0" (elements 8..15), itself at offset 1 in the view.
            "on_view": ("FloatStorage", "0", 20, 1, (2, 2), (1, 3), ("0v", 8, 8)),
            "half": ("HalfStorage", "1", 6, 0, (3, 2), (2, 1), None),
        },
        legacy=True,
    )
    want = {
        "w": floats.reshape(4, 5),
        "w_t": floats.reshape(4, 5).T,
        "strided": np.stack([floats[3:8:2], floats[10:15:2]]),
        "on_view": np.array([[floats[9], floats[12]], [floats[10], floats[13]]]),
        "half": halves.reshape(3, 2),
    }
    return _legacy_bytes(pickled, {"0": floats, "1": halves}), want


def test_legacy_format_arrays_bit_for_bit(tmp_path):
    data, want = _legacy_example()
    path = tmp_path / "legacy.pth"
    path.write_bytes(data)
    sd = load_torch_state_dict(path)
    assert sorted(sd) == sorted(want)
    for k, v in want.items():
        assert sd[k].dtype == v.dtype and sd[k].shape == v.shape, k
        assert sd[k].tobytes() == np.ascontiguousarray(v).tobytes(), k
        assert sd[k].flags.c_contiguous and sd[k].flags.owndata, k
    assert sd["half"].dtype == np.float16 and sd["w"].dtype == np.float32
    assert "torch" not in sys.modules


def test_truncated_legacy_file_is_a_clear_error(tmp_path):
    data, _ = _legacy_example()
    header = len(pickle.dumps(_LEGACY_MAGIC, protocol=2))
    # Cut in the header pickles, the state dict pickle, the key list, a storage's element count
    # (the last 108 bytes are 8 + 20 * 4 and 8 + 6 * 2) and the storage bytes.
    n = len(data)
    for cut in (header, header + 12, n // 2, n - 120, n - 104, n - 50, n - 1):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated"):
            load_torch_state_dict(path)


def test_legacy_storage_with_wrong_element_count_is_corrupt(tmp_path):
    pickled = _fake_torch_pickle({"t": ("FloatStorage", "0", 4, 0, (4,), (1,))}, legacy=True)
    data = bytearray(_legacy_bytes(pickled, {"0": np.arange(4, dtype=np.float32)}))
    data[-16 - 8 : -16] = (5).to_bytes(8, "little")  # the count before the 16 data bytes
    path = tmp_path / "count.pth"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="holds 5 elements.*expects 4"):
        load_torch_state_dict(path)


def test_legacy_pickle_naming_other_globals_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_bytes(evil, {}))
    with pytest.raises(ValueError, match=r"refusing to load global os\.system"):
        load_torch_state_dict(path)
    assert not marker.exists()
