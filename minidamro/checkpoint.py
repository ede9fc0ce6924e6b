"""safetensors files read and written with torch alone: no numpy, so the runtime needs only what it declares.

The format is 8 bytes of header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw
little-endian data. Reading memory-maps the file (torch.UntypedStorage.from_file); writing streams one tensor
at a time, so neither ever holds the whole model. Python's file objects take any buffer, and a tensor's bytes
become one through ctypes (`raw_bytes`), which is what `.numpy()` was used for before.
"""
import ctypes
import json
import os

import torch

from . import MinidamroError

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8}
CODES = {v: k for k, v in DTYPES.items()}


def raw_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a writable buffer (for file.write / file.readinto), no copy. The
    tensor must outlive the buffer."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("raw_bytes needs a contiguous CPU tensor")
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B") if n else memoryview(bytearray())


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Memory-map a safetensors file: the tensors are views of the file's pages, not copies.

    torch.UntypedStorage.from_file maps the file privately (copy-on-write), so pages are read from disk only
    when touched and never written back.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            numel = 1
            for s in info["shape"]:
                numel *= s
            start = 8 + n + begin
            if end - begin != numel * dtype.itemsize or 8 + n + end > size or start % dtype.itemsize:
                raise ValueError(f"tensor {name} does not fit the file")
            out[name] = torch.empty(0, dtype=dtype).set_(storage, start // dtype.itemsize, info["shape"])
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise MinidamroError(f"cannot read weights {path}: {e}") from None


def write_safetensors(path: str, shapes: dict, dtype, tensor):
    """Write `shapes` {name: shape} in order, each tensor in `dtype` (one dtype, or {name: dtype}), tensor(name)
    giving each one's values when its turn comes: the header from the shapes first, then one tensor at a time
    (never the whole model in memory). The caller writes to a temporary name and renames (a half-written file
    never has the real name)."""
    dtypes = dtype if isinstance(dtype, dict) else dict.fromkeys(shapes, dtype)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        dtype = dtypes[name]
        if offset % dtype.itemsize:  # the format has no padding: the reader could not map it in place
            raise MinidamroError(f"cannot write {name}: it would start at byte {offset}, not a multiple of "
                                 f"{dtype.itemsize}")
        size = dtype.itemsize * torch.Size(shape).numel()
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data (and every tensor in it) starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape in shapes.items():
            t = tensor(name).detach().to("cpu", dtypes[name]).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)}, header says {tuple(shape)}")
            f.write(raw_bytes(t))
            del t
    if os.path.getsize(path) != 8 + len(blob) + offset:
        raise MinidamroError(f"{path} was not written completely")


def read_into(path: str, offset: int, out: torch.Tensor):
    """Fill the contiguous CPU tensor `out` with the bytes of `path` from `offset` (a copy that never touches a
    memory-mapped view of the same file)."""
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(raw_bytes(out)) != out.numel() * out.element_size():
            raise MinidamroError(f"cannot read weights {path}: the file is cut short")
