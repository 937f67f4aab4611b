"""Reads `torch.save(model.state_dict())` files without PyTorch.

A modern torch.save file is a zip archive:

    <top>/data.pkl          the pickled state dict; tensors are calls to torch._utils._rebuild_*
                            whose storages are pickle "persistent ids" naming a record below
    <top>/data/<key>        the raw bytes of each storage
    <top>/byteorder         "little" or "big" (absent in old files, which are little-endian)

A legacy torch.save file (PyTorch < 1.6, or `_use_new_zipfile_serialization=False`; e.g. the
pytorch-fid Inception weights) is a plain stream of consecutive pickles followed by raw bytes:

    magic number 0x1950a86a20f9469cfc6c, protocol version 1001, a sys_info dict
    the pickled state dict; storages are persistent ids
                            ('storage', storage type, root key, location, numel, view metadata)
    the list of root storage keys, in the order their data follows
    per key: numel as an 8-byte little-endian integer, then numel * itemsize bytes (little-endian;
    torch writes little-endian whatever the machine)

Every pickle is read by a restricted `pickle.Unpickler`: `find_class` resolves only the handful of
globals a state dict needs (OrderedDict, the tensor/parameter rebuild functions and the typed
storage classes) to local stand-ins, so nothing from the file is ever imported or executed. Any
other global is refused with an error naming it.
"""

import collections
import io
import os
import pickle
import zipfile
from typing import BinaryIO

import ml_dtypes
import numpy as np

from gdiff import errors, progress

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


# What torch's legacy writer puts first: pickle protocol 2 of the magic number (how the format is
# recognised), then the format version.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
_LEGACY_HEADER = pickle.dumps(_LEGACY_MAGIC, protocol=2)


class _Storage:
    """A storage record resolved to a flat numpy array (for legacy files: filled in after the
    state dict pickle, so tensors are views of it until `load_torch_state_dict` copies them)."""

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
    # A view, not a copy: a legacy file's storage bytes come after this pickle and are written
    # into `flat` in place later. `load_torch_state_dict` makes the contiguous copies.
    return np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
    )


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
    """Unpickles a state dict; a zip file's storages come from `records` {key: () -> bytes}."""

    def __init__(self, stream: BinaryIO, records: dict, byteorder: str):
        super().__init__(stream)
        self._records = records
        self._byteorder = byteorder
        self._storages: dict[str, _Storage] = {}  # root storages by key
        self._views: dict[str, _Storage] = {}  # legacy view_metadata slices by view key

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
        if numel < 0:
            raise ValueError(f"storage {key} has a negative size {numel}: the file is corrupt")
        if key not in self._storages:
            self._storages[key] = _Storage(self._read_storage(storage_type, key, numel), key)
        root = self._storages[key]
        view = pid[5] if len(pid) > 5 else None
        return root if view is None else self._view(root, view)

    def _read_storage(self, storage_type: _StorageType, key: str, numel: int) -> np.ndarray:
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
        return np.frombuffer(raw, dtype=dtype, count=numel).astype(dtype.newbyteorder("="))

    def _view(self, root: _Storage, view) -> _Storage:
        """Legacy files may name a slice of a root storage: (view key, offset, size) in elements."""
        if not (isinstance(view, tuple) and len(view) == 3):
            raise pickle.UnpicklingError(f"unsupported storage view metadata {view!r}")
        view_key, offset, size = str(view[0]), int(view[1]), int(view[2])
        if view_key not in self._views:
            if offset < 0 or size < 0 or offset + size > root.array.size:
                raise ValueError(
                    f"storage view {view_key} [{offset}, {offset + size}) lies outside storage "
                    f"{root.key} ({root.array.size} elements): the file is corrupt"
                )
            self._views[view_key] = _Storage(root.array[offset : offset + size], view_key)
        return self._views[view_key]


class _LegacyUnpickler(_StateDictUnpickler):
    """Legacy storages are allocated when first named and filled after the pickle is read."""

    def __init__(self, stream: BinaryIO, file_size: int):
        super().__init__(stream, {}, "little")
        self._file_size = file_size

    def _read_storage(self, storage_type: _StorageType, key: str, numel: int) -> np.ndarray:
        # Bound the allocation by what the file can hold, so a corrupt size cannot exhaust memory.
        if numel * storage_type.dtype.itemsize > self._file_size:
            raise ValueError(
                f"storage {key} claims {numel} x {storage_type.name}, more than the whole file "
                f"({self._file_size} bytes): the file is truncated or corrupt"
            )
        return np.zeros(numel, storage_type.dtype)

    def fill_storages(self, stream: BinaryIO) -> None:
        """Reads the storage key list and each storage's bytes (after the state dict pickle)."""
        keys = _StateDictUnpickler(stream, {}, "little").load()
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise ValueError(f"expected the list of storage keys, got {type(keys).__name__}")
        if sorted(keys) != sorted(self._storages):
            raise ValueError(
                f"the storage key list {sorted(keys)} does not match the storages the state "
                f"dict uses {sorted(self._storages)}: the file is corrupt"
            )
        for key in keys:
            flat = self._storages[key].array
            head = stream.read(8)
            if len(head) < 8:
                raise ValueError(f"storage {key}: the file ends early; it is truncated or corrupt")
            count = int.from_bytes(head, "little")
            if count != flat.size:
                raise ValueError(
                    f"storage {key} holds {count} elements, the state dict expects {flat.size}: "
                    "the file is corrupt"
                )
            raw = stream.read(count * flat.dtype.itemsize)
            if len(raw) < count * flat.dtype.itemsize:
                raise ValueError(
                    f"storage {key} has {len(raw)} bytes, expected {count * flat.dtype.itemsize}"
                    f" ({count} x {flat.dtype}): the file is truncated or corrupt"
                )
            flat[...] = np.frombuffer(raw, dtype=flat.dtype.newbyteorder("<"))


def _load_legacy(stream: BinaryIO) -> object:
    """The state dict object of a legacy torch.save stream (header already recognised)."""

    def plain():  # a header pickle: plain values, through the same restricted unpickler
        return _StateDictUnpickler(stream, {}, "little").load()

    if plain() != _LEGACY_MAGIC:
        raise ValueError("bad legacy magic number")
    version = plain()
    if version != _LEGACY_PROTOCOL_VERSION:
        raise ValueError(f"unsupported legacy torch.save protocol version {version!r}")
    sys_info = plain()
    if not isinstance(sys_info, dict):
        raise ValueError(f"expected the legacy sys_info dict, got {type(sys_info).__name__}")
    unpickler = _LegacyUnpickler(stream, os.fstat(stream.fileno()).st_size)
    obj = unpickler.load()
    unpickler.fill_storages(stream)
    return obj


_PROGRESS_BYTES = 64 * 2**20  # files larger than this show a progress bar while read


def _load_zip(path: str) -> object:
    """The state dict object of a zip-format torch.save file."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(
            f"neither a readable zip-format torch.save file ({e}) nor a legacy one (no legacy "
            "magic number): not a torch checkpoint, or truncated or corrupt"
        ) from e
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"expected one <top>/data.pkl record, found {pickles}")
        top = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if top + "byteorder" in names:
            byteorder = archive.read(top + "byteorder").decode().strip()
            if byteorder not in ("little", "big"):
                raise ValueError(f"unknown byteorder record {byteorder!r}")
        data_prefix = top + "data/"
        data = [n for n in names if n.startswith(data_prefix)]
        total = sum(archive.getinfo(n).file_size for n in data)
        # A released checkpoint (up to ~2 GB) takes a while to read: show it.
        bar = None
        if total > _PROGRESS_BYTES:
            bar = progress.bar(
                total, desc=f"read {os.path.basename(path)}", unit="B", unit_scale=True
            )

        def read(name: str) -> bytes:
            raw = archive.read(name)
            if bar is not None:
                bar.update(len(raw))
            return raw

        records = {n[len(data_prefix) :]: (lambda n=n: read(n)) for n in data}
        stream = io.BytesIO(archive.read(pickles[0]))
        try:
            return _StateDictUnpickler(stream, records, byteorder).load()
        finally:
            if bar is not None:
                bar.close()


def _contiguous(obj: object) -> object:
    """Every array of a loaded object as a C-contiguous copy owning its memory (containers kept)."""
    if isinstance(obj, np.ndarray):
        return np.array(obj, order="C")
    if isinstance(obj, dict):
        return type(obj)((k, _contiguous(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_contiguous(v) for v in obj)
    return obj


def load_torch_file(path: str | os.PathLike) -> object:
    """Loads any `torch.save` file made of tensors, dicts, lists, tuples and plain values.

    E.g. `torch.optim.AdamW.state_dict()` (what the reference's TrainLoop.save() writes to
    `opt*.pt`): {"state": {index: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}.
    Tensors become numpy arrays (C-contiguous copies, saved dtype); the same restricted unpickler
    as `load_torch_state_dict`, so nothing from the file is imported or executed.

    Raises:
      errors.MissingInputError (a FileNotFoundError): no such file, or a directory.
      errors.InputError (a ValueError): neither torch.save format, truncated, corrupt, or naming
        any other global; the message names the file.
    """
    path = os.fspath(path)
    errors.require_file(path, "torch checkpoint", "give the path of the torch.save .pt file")
    try:
        with open(path, "rb") as f:
            legacy = f.read(len(_LEGACY_HEADER)) == _LEGACY_HEADER
            f.seek(0)
            kind = "legacy torch.save file" if legacy else "torch.save file"
            obj = _load_legacy(f) if legacy else _load_zip(path)
    except OSError as e:
        raise errors.InputError(f"cannot read {path}: {e}") from e
    except EOFError as e:
        raise errors.InputError(f"{path}: the {kind} ends early ({e}): truncated or corrupt") from e
    except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError) as e:
        raise errors.InputError(f"{path}: cannot read the {kind}: {e}") from e
    except ValueError as e:
        raise errors.InputError(f"{path}: {e}") from e
    except Exception as e:  # anything else a damaged pickle stream can raise
        raise errors.InputError(f"{path}: corrupt {kind}: {e!r}") from e
    return _contiguous(obj)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a state dict written by `torch.save(module.state_dict(), path)`.

    Args:
      path: a zip-format torch.save file (PyTorch >= 1.6; the released ADM checkpoints) or a legacy
        one (older PyTorch; the pytorch-fid Inception weights).

    Returns:
      {reference parameter name: numpy array}, in the file's order, with the saved dtype (float16
      checkpoints stay float16; `convert_state_dict` casts to float32) and native byte order; each
      array is a contiguous copy, also where the file's tensors share a storage.

    Raises:
      errors.MissingInputError (a FileNotFoundError): no such file, or a directory.
      errors.InputError (a ValueError): neither torch.save format, truncated, corrupt, or not a
        flat state dict; pickle.UnpicklingError (wrapped): the pickle names anything beyond tensors.
    """
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise errors.InputError(
            f"{path}: expected a state dict (a mapping), got {type(obj).__name__}; save "
            "model.state_dict() itself"
        )
    out = {}
    for key, value in obj.items():
        if not isinstance(value, np.ndarray):
            raise errors.InputError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; save "
                "model.state_dict() itself"
            )
        out[str(key)] = value
    return out
