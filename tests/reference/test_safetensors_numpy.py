"""Reference check of shardtune's safetensors reader/writer against an independent numpy parser.

The format is parsed and written here by hand (the `safetensors` package is not installed): 8-byte
little-endian header length, JSON header, data buffer. Checks, both ways:
  * files written by shardtune (tests/tools/st_write_sample) have the expected names, shapes, dtypes and
    bit-exact values, 8-byte aligned data, and contiguous offsets that cover the whole buffer (the strict
    rule of the reference Rust implementation); the sharded layout and index.json are consistent;
  * files written by numpy (F32, BF16 via uint16 views, F16 incl. subnormal/inf/-0, F64, I64) are read by
    shardtune with the same fp32 values numpy computes; a truncated file is refused with a clear message.
"""
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

BUILD = os.environ.get("ST_BUILD_DIR", "build")
TOOL = os.path.join(BUILD, "st_write_sample")
NP_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "U8": "u1"}


def expected_tensors():
    i12 = np.arange(12, dtype=np.float32)
    return {
        "arange": (i12 * np.float32(0.5) - np.float32(2)).reshape(3, 4),
        "h.0.attn.c_attn.weight": (np.arange(24, dtype=np.float32) / np.float32(3)).reshape(4, 6),
        "scalar": np.array(42, dtype=np.float32),
        "vec": -(np.arange(5, dtype=np.float32) ** 2),
        "model.layers.0.mlp.up_proj.weight":
            ((np.arange(128) % 7).astype(np.float32) * np.float32(0.25) - np.float32(1)).reshape(16, 8),
    }


def parse_safetensors(path):
    """Independent parser: returns (metadata, {name: (dtype, shape, array)}, header_len, order)."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    assert 8 + n <= len(raw), f"{path}: header length {n} beyond file"
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    buf = raw[8 + n:]
    meta = header.pop("__metadata__", None)
    out, spans = {}, []
    for name, e in header.items():
        b, end = e["data_offsets"]
        arr = np.frombuffer(buf[b:end], dtype=NP_DTYPES[e["dtype"]]).reshape(e["shape"])
        out[name] = (e["dtype"], list(e["shape"]), arr)
        spans.append((b, end, name))
    spans.sort()
    pos = 0
    for b, end, name in spans:  # contiguous, no gaps or overlaps, covering the buffer
        assert b == pos, f"{path}: tensor {name} starts at {b}, expected {pos}"
        pos = end
    assert pos == len(buf), f"{path}: data buffer has {len(buf)} bytes, tensors cover {pos}"
    return meta, out, n, list(header.keys())


def same_bits(a, b):
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def check_written_file(tmp):
    path = os.path.join(tmp, "sample.safetensors")
    subprocess.run([TOOL, "write", path], check=True)
    meta, tensors, hlen, order = parse_safetensors(path)
    assert hlen % 8 == 0, f"header length {hlen} not a multiple of 8"
    assert meta == {"format": "pt", "producer": "shardtune"}, meta
    exp = expected_tensors()
    assert order == list(exp.keys()), order
    for name, want in exp.items():
        dtype, shape, arr = tensors[name]
        assert dtype == "F32", (name, dtype)
        assert shape == list(want.shape), (name, shape, want.shape)
        assert same_bits(arr, want), f"{name}: values differ"
    print(f"ok: shardtune-written file parsed by numpy ({len(exp)} tensors, header {hlen} bytes)")


def check_sharded(tmp):
    d = os.path.join(tmp, "sharded")
    max_bytes = 150  # 48+96+4 | 20 | 512 (alone: larger than the limit) -> 3 shards
    subprocess.run([TOOL, "sharded", d, str(max_bytes)], check=True)
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    exp = expected_tensors()
    total = sum(v.nbytes for v in exp.values())
    assert index["metadata"]["total_size"] == total, index["metadata"]
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{k:05d}-of-00003.safetensors" for k in (1, 2, 3)], shards
    seen = {}
    for shard in shards:
        meta, tensors, _, _ = parse_safetensors(os.path.join(d, shard))
        assert meta == {"format": "pt"}, meta
        size = sum(a.nbytes for _, _, a in tensors.values())
        assert size <= max_bytes or len(tensors) == 1, (shard, size)
        for name, (_, _, arr) in tensors.items():
            assert name not in seen and index["weight_map"][name] == shard, name
            seen[name] = arr
    assert set(seen) == set(exp)
    for name, want in exp.items():
        assert same_bits(seen[name], want), name
    assert not os.path.exists(os.path.join(d, "model.safetensors"))
    print(f"ok: sharded export ({len(shards)} shards, total_size {total}) parsed by numpy")


def write_numpy_safetensors(path, tensors, metadata=None):
    """tensors: list of (name, dtype, shape, bytes)."""
    header, off, blobs = {}, 0, []
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
        blobs.append(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def dump(path):
    r = subprocess.run([TOOL, "dump", path], capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def check_numpy_written(tmp):
    rng = np.random.default_rng(7)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    # bf16: keep the top 16 bits of fp32 values (plus inf and nan), stored as a uint16 view
    src = np.concatenate([rng.standard_normal(6).astype(np.float32),
                          np.array([np.inf, -np.inf, -0.0, 1e-40], dtype=np.float32)])
    bf = (src.view(np.uint32) >> 16).astype(np.uint16)
    bf_want = (bf.astype(np.uint32) << 16).view(np.float32)
    f16 = np.array([1.0, -2.5, 6e-8, 6.1e-5, 65504, np.inf, -np.inf, -0.0, 0.333], dtype=np.float16)
    f64 = rng.standard_normal(4)
    i64 = np.arange(3, dtype=np.int64)
    path = os.path.join(tmp, "numpy.safetensors")
    write_numpy_safetensors(path, [
        ("model.embed_tokens.weight", "F32", f32.shape, f32.tobytes()),
        ("model.norm.weight", "BF16", bf.shape, bf.astype("<u2").tobytes()),
        ("half", "F16", f16.shape, f16.astype("<f2").tobytes()),
        ("double", "F64", f64.shape, f64.astype("<f8").tobytes()),
        ("ids", "I64", i64.shape, i64.tobytes()),
    ], metadata={"format": "pt"})
    rc, out, err = dump(path)
    assert rc == 0, err
    want = {"model.embed_tokens.weight": f32, "model.norm.weight": bf_want,
            "half": f16.astype(np.float32), "double": f64.astype(np.float32)}
    rows = [line.split("\t") for line in out.strip().split("\n")]
    assert [r[0] for r in rows] == ["model.embed_tokens.weight", "model.norm.weight", "half", "double", "ids"], rows
    for name, dtype, shape, values in rows:
        if name == "ids":
            assert dtype == "I64" and values == "unsupported", (dtype, values)
            continue
        w = want[name]
        assert shape == ",".join(str(s) for s in w.shape), (name, shape)
        got = np.array([int(x, 16) for x in values.split()], dtype=np.uint32).view(np.float32)
        assert same_bits(got, w.reshape(-1)), f"{name}: got {got} want {w.reshape(-1)}"
    print("ok: numpy-written F32/BF16/F16/F64 file read by shardtune with identical fp32 values")

    # a truncated copy is refused, naming the file and the tensor
    raw = open(path, "rb").read()
    bad = os.path.join(tmp, "truncated.safetensors")
    open(bad, "wb").write(raw[:-5])
    rc, out, err = dump(bad)
    assert rc != 0 and "truncated.safetensors" in err and "'ids'" in err and "beyond end of file" in err, err
    print("ok: truncated file refused:", err.strip())

    # and a numpy-written sharded directory opens through its index
    d = os.path.join(tmp, "np_sharded")
    os.makedirs(d)
    write_numpy_safetensors(os.path.join(d, "model-00001-of-00002.safetensors"),
                            [("a", "F32", f32.shape, f32.tobytes())])
    write_numpy_safetensors(os.path.join(d, "model-00002-of-00002.safetensors"),
                            [("b", "BF16", bf.shape, bf.tobytes())])
    json.dump({"metadata": {"total_size": f32.nbytes + bf.nbytes},
               "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}},
              open(os.path.join(d, "model.safetensors.index.json"), "w"))
    rc, out, err = dump(d)
    assert rc == 0, err
    rows = {line.split("\t")[0]: line.split("\t") for line in out.strip().split("\n")}
    got_b = np.array([int(x, 16) for x in rows["b"][3].split()], dtype=np.uint32).view(np.float32)
    assert set(rows) == {"a", "b"} and same_bits(got_b, bf_want)
    print("ok: numpy-written sharded directory read through model.safetensors.index.json")


def main():
    if not os.path.exists(TOOL):
        print(f"missing {TOOL}: build the project first", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        check_written_file(tmp)
        check_sharded(tmp)
        check_numpy_written(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
