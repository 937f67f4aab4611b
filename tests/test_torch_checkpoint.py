"""load_torch_state_dict: a torch.save zip reader that never imports torch nor runs the pickle."""

import io
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest
from conftest import PARITY_DIR, load_fixture

from gdiff.compat.torch_checkpoint import load_torch_state_dict


def test_released_format_file_equals_fixture_bit_for_bit():
    z = load_fixture("unet_small_legacy.npz")
    sd = load_torch_state_dict(PARITY_DIR / "unet_small_legacy.pt")
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


def _fake_torch_pickle(entries) -> bytes:
    """Pickles {name: (storage_cls, key, numel, offset, size, stride)} the way torch.save does,
    using stand-in modules named torch / torch._utils (removed again afterwards)."""
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
            cls, key, numel, offset, size, stride = self.spec
            return (_rebuild_tensor_v2, (Storage(cls, key, numel), offset, size, stride, False))

    class Storage:
        def __init__(self, cls, key, numel):
            self.pid = ("storage", classes[cls], key, "cpu", numel)

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
    data = (PARITY_DIR / "unet_small_legacy.pt").read_bytes()
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
