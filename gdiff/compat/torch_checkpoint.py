"""Reads `torch.save(model.state_dict())` files without PyTorch.

A modern torch.save file is a zip archive:

    <top>/data.pkl          the pickled state dict; tensors are calls to torch._utils._rebuild_*
                            whose storages are pickle "persistent ids" naming a record below
    <top>/data/<key>        the raw bytes of each storage
    <top>/byteorder         "little" or "big" (absent in old files, which are little-endian)

The pickle is read by a restricted `pickle.Unpickler`: `find_class` resolves only the handful of
globals a state dict needs (OrderedDict, the tensor/parameter rebuild functions and the typed
storage classes) to local stand-ins, so nothing from the file is ever imported or executed. Any
other global is refused with an error naming it.
"""

import collections
import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np

# torch's typed storage classes (the names torch.save writes) -> element dtype.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    """Stands in for a torch storage class: only remembers the element dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A storage record resolved to a flat numpy array."""

    def __init__(self, array: np.ndarray, key: str):
        self.array = array
        self.key = key


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, *args):
    """Builds the array a tensor views: dtype, shape, strides (in elements) and offset."""
    del requires_grad, args  # backward hooks and metadata carry nothing a state dict needs
    if not isinstance(storage, _Storage):
        raise ValueError(f"tensor refers to a non-storage object {type(storage).__name__}")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride):
        raise ValueError(f"tensor size {size} and stride {stride} differ in length")
    flat = storage.array
    offset = int(storage_offset)
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise ValueError(f"negative size/stride/offset in tensor on storage {storage.key}")
    if 0 in size:
        return np.zeros(size, flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= flat.size:
        raise ValueError(
            f"tensor (offset {offset}, size {size}, stride {stride}) reads past the end of "
            f"storage {storage.key} ({flat.size} elements): the file is corrupt"
        )
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
    )
    return np.array(view)  # a contiguous copy that owns its memory


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
    del requires_grad, backward_hooks, args
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, records: dict, byteorder: str):
        super().__init__(io.BytesIO(data))
        self._records = records
        self._byteorder = byteorder
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: a state dict only needs tensors, "
            "OrderedDict and torch storages (this file may not be a plain state dict, or may be "
            "malicious)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1], str(pid[2]), pid[3], int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if key in self._storages:
            return self._storages[key]
        if key not in self._records:
            raise ValueError(f"storage record data/{key} is missing from the archive")
        raw = self._records[key]()
        dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
        need = numel * dtype.itemsize
        if len(raw) < need:
            raise ValueError(
                f"storage data/{key} has {len(raw)} bytes, expected {need} "
                f"({numel} x {storage_type.name}): the file is truncated or corrupt"
            )
        flat = np.frombuffer(raw, dtype=dtype, count=numel).astype(dtype.newbyteorder("="))
        self._storages[key] = _Storage(flat, key)
        return self._storages[key]


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a state dict written by `torch.save(module.state_dict(), path)`.

    Args:
      path: a zip-format torch.save file (PyTorch >= 1.6; the released ADM checkpoints).

    Returns:
      {reference parameter name: numpy array}, with the saved dtype (float16 checkpoints stay
      float16; `convert_state_dict` casts to float32) and native byte order.

    Raises:
      ValueError: not a zip-format torch file, truncated, corrupt, or not a flat state dict.
      pickle.UnpicklingError (wrapped in ValueError): the pickle names anything beyond tensors.
    """
    path = os.fspath(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(
            f"{path} is not a readable zip-format torch.save file ({e}); legacy (pre-1.6) "
            "torch files are not supported"
        ) from e
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one <top>/data.pkl record, found {pickles}")
        top = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if top + "byteorder" in names:
            byteorder = archive.read(top + "byteorder").decode().strip()
            if byteorder not in ("little", "big"):
                raise ValueError(f"{path}: unknown byteorder record {byteorder!r}")
        data_prefix = top + "data/"
        records = {
            n[len(data_prefix) :]: (lambda n=n: archive.read(n))
            for n in names
            if n.startswith(data_prefix)
        }
        try:
            obj = _StateDictUnpickler(archive.read(pickles[0]), records, byteorder).load()
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError) as e:
            raise ValueError(f"{path}: cannot read the state dict: {e}") from e
        except Exception as e:
            if isinstance(e, ValueError):
                raise ValueError(f"{path}: {e}") from e
            raise ValueError(f"{path}: corrupt state dict pickle: {e!r}") from e

    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (a mapping), got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, np.ndarray):
            raise ValueError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; save "
                "model.state_dict() itself"
            )
        out[str(key)] = value
    return out
