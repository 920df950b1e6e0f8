"""st_io.py — a tiny, independent safetensors reader/writer in numpy for the reference tests.

Format: 8-byte little-endian header length N, N bytes of JSON header
({name: {"dtype", "shape", "data_offsets": [begin, end]}, optional "__metadata__"}), then the raw
little-endian data buffer that the offsets index. The `safetensors` package is not installed here, so
this module is written from the format description alone (it shares no code with shardtune's C reader).
read() returns fresh numpy arrays (the caller owns them); write() never keeps references."""
import json
import os
import struct

import numpy as np

DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U8": "u1", "BOOL": "?"}
NAMES = {np.dtype(v).str: k for k, v in DTYPES.items() if k != "BF16"}  # '<f4' -> 'F32'; no BF16 writes


def read(path):
    """{name: array} in header order. BF16 tensors are widened to float32."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: too short for a safetensors header")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise ValueError(f"{path}: header length {n} runs past the end of the file")
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    header.pop("__metadata__", None)
    buf = memoryview(raw)[8 + n:]
    out = {}
    for name, e in header.items():
        begin, end = e["data_offsets"]
        if not 0 <= begin <= end <= len(buf):
            raise ValueError(f"{path}: tensor {name} offsets {begin}..{end} outside the data buffer")
        arr = np.frombuffer(buf[begin:end], dtype=DTYPES[e["dtype"]]).copy()
        if e["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr.reshape(e["shape"])
    return out


def read_model(model_dir):
    """All tensors of a model dir: model.safetensors, or the shards named by model.safetensors.index.json."""
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        return read(single)
    with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(read(os.path.join(model_dir, shard)))
    return out


def write(path, tensors, metadata=None):
    """Writes {name: array} in the given order, data contiguous (no gaps) after an 8-byte aligned header."""
    header, chunks, pos = {}, [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        if a.dtype.str not in NAMES:
            raise ValueError(f"tensor {name}: dtype {a.dtype} has no safetensors name here")
        data = a.tobytes()
        header[name] = {"dtype": NAMES[a.dtype.str], "shape": list(a.shape), "data_offsets": [pos, pos + len(data)]}
        chunks.append(data)
        pos += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    js = json.dumps(header, separators=(",", ":")).encode("utf-8")
    js += b" " * ((-(8 + len(js))) % 8)  # the data buffer starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(js)))
        f.write(js)
        for c in chunks:
            f.write(c)
