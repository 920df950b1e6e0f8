"""test_dataset_h5py.py — `shardtune data pack` output checked with h5py, and h5py-written files
checked through our reader (tests/tools/dataset_check). Expected values are computed here in Python
from the same input documents. Env: SHARDTUNE_BIN, ST_BUILD_DIR (set by ctest)."""
import json
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np

BIN = os.environ["SHARDTUNE_BIN"]
CHECK = os.path.join(os.environ["ST_BUILD_DIR"], "dataset_check")


def run(*args):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=60)


def fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def check_jsonl(tmp):
    docs = [
        {"input_ids": [101, 7, 8, 9, 102], "labels": [-100, -100, 8, 9, 102]},
        {"input_ids": [5]},
        {"input_ids": [3, 4, 500], "labels": [3, 4, 500]},
    ]
    src = os.path.join(tmp, "in.jsonl")
    with open(src, "w") as f:
        f.write(json.dumps(docs[0]) + "\n\n")
        for d in docs[1:]:
            f.write(json.dumps(d) + "\n")
    out = os.path.join(tmp, "out.h5")
    eos = 1000
    r = run("data", "pack", "--jsonl", src, "--out", out, "--eos", str(eos), "--vocab", "1024")
    assert r.returncode == 0, r.stderr
    tokens, mask, offsets = [], [], [0]
    for d in docs:
        tokens += d["input_ids"] + [eos]
        labels = d.get("labels", d["input_ids"])
        mask += [int(l != -100) for l in labels] + [1]
        offsets.append(len(tokens))
    assert f"docs=3 tokens={len(tokens)} masked=2 vocab=1024" in r.stdout, r.stdout
    with h5py.File(out, "r") as f:
        assert f["tokens"].dtype == np.uint32 and f["tokens"].shape == (len(tokens),)
        assert f["loss_mask"].dtype == np.uint8
        assert f["doc_offsets"].dtype == np.uint64
        assert f["tokens"][:].tolist() == tokens
        assert f["loss_mask"][:].tolist() == mask
        assert f["doc_offsets"][:].tolist() == offsets
        for name, want in (("vocab_size", 1024), ("eos_id", eos)):
            a = f.attrs[name]
            assert a.dtype == np.int64 and int(a) == want, (name, a)
    assert not os.path.exists(out + ".partial")
    # Our reader's checksum agrees with an FNV-1a computed here.
    r = subprocess.run([CHECK, out], capture_output=True, text=True, timeout=60)
    want = fnv1a(np.array(tokens, "<u4").tobytes() + np.array(mask, "u1").tobytes())
    assert r.returncode == 0 and f"checksum={want:016x}" in r.stdout, (r.stdout, want)

    # Errors: one line naming file:line, exit 1, no output left behind; usage errors exit 2.
    with open(src, "a") as f:
        f.write('{"input_ids": [1, 2], "labels": [1, 3]}\n')
    bad_out = os.path.join(tmp, "bad.h5")
    r = run("data", "pack", "--jsonl", src, "--out", bad_out)
    assert r.returncode == 1, r
    assert f"{src}:5: labels[1] = 3 differs" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not os.path.exists(bad_out) and not os.path.exists(bad_out + ".partial")
    assert run("data", "pack", "--jsonl", src).returncode == 2
    assert run("data", "unpack").returncode == 2
    assert run("data", "pack", "--jsonl", src, "--llmc-bin", "x", "--out", bad_out).returncode == 2
    assert run("data", "pack", "--jsonl", src, "--out", bad_out, "--vocab", "ten").returncode == 2


def check_llmc(tmp):
    eot = 50256
    shards = [[eot, 10, 11, eot, 12], [13, 14, eot, 15]]  # doc 2 continues into shard 1
    for i, toks in enumerate(shards):
        header = np.zeros(256, "<i4")
        header[:3] = (20240520, 1, len(toks))
        with open(os.path.join(tmp, f"s_{i:06d}.bin"), "wb") as f:
            f.write(header.tobytes() + np.array(toks, "<u2").tobytes())
    out = os.path.join(tmp, "llmc.h5")
    r = run("data", "pack", "--llmc-bin", os.path.join(tmp, "s_*.bin"), "--out", out)
    assert r.returncode == 0, r.stderr
    flat = shards[0] + shards[1]
    starts = [0] + [i for i in range(1, len(flat)) if flat[i] == eot]
    with h5py.File(out, "r") as f:
        assert f["tokens"][:].tolist() == flat
        assert f["doc_offsets"][:].tolist() == starts + [len(flat)]
        assert f["loss_mask"][:].tolist() == [1] * len(flat)
        assert int(f.attrs["eos_id"]) == eot and int(f.attrs["vocab_size"]) == eot + 1


def check_h5py_written(tmp):
    """Files written by another tool: no /loss_mask means all ones; bad values are refused."""
    path = os.path.join(tmp, "ext.h5")
    toks = np.arange(20, dtype=np.uint32) % 17
    with h5py.File(path, "w") as f:
        f["tokens"] = toks
        f["doc_offsets"] = np.array([0, 8, 20], np.uint64)
        f.attrs["vocab_size"] = 17
    r = subprocess.run([CHECK, path], capture_output=True, text=True, timeout=60)
    want = fnv1a(toks.astype("<u4").tobytes() + bytes([1] * 20))
    assert r.returncode == 0 and "docs=2 tokens=20 masked=0 vocab=17 eos=-1" in r.stdout, r.stdout
    assert f"checksum={want:016x}" in r.stdout
    with h5py.File(path, "a") as f:
        f.attrs["vocab_size"] = 16
    r = subprocess.run([CHECK, path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "/tokens[16] = 16 is not below vocab_size 16" in r.stdout, r.stdout


def main():
    with tempfile.TemporaryDirectory() as tmp:
        check_jsonl(tmp)
        check_llmc(tmp)
        check_h5py_written(tmp)
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
