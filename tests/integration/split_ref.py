"""split_ref.py — an independent reimplementation of the loader's by-document split (worker/loader.c,
docs/data.md) for the shell tests: xoshiro256** seeded by splitmix64 with stream (1 << 56) | task,
Fisher-Yates over the document indices, llround sizes (train >= 1), each split in file order.
Reads the dataset with h5py. Usage as a module: splits(path, seed, task, fractions) -> [train, val, test]."""
import h5py
import numpy as np

M = (1 << 64) - 1


def _splitmix(x):
    x = (x + 0x9E3779B97F4A7C15) & M
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    return x, z ^ (z >> 31)


def _rotl(x, k):
    return ((x << k) | (x >> (64 - k))) & M


class Rng:
    def __init__(self, seed, stream):
        x = seed ^ ((stream * 0xD1342543DE82EF95 + 0x632BE59BD9B4E019) & M)
        self.s = []
        for _ in range(4):
            x, v = _splitmix(x)
            self.s.append(v)

    def u64(self):
        s = self.s
        r = (_rotl((s[1] * 5) & M, 7) * 9) & M
        t = (s[1] << 17) & M
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = _rotl(s[3], 45)
        return r

    def below(self, n):
        limit = M - (M % n)
        while True:
            x = self.u64()
            if x < limit:
                return x % n


def llround(x):
    return int(np.floor(x + 0.5))


def read(path):
    """tokens, loss_mask (or None), doc_offsets (int64), attrs of a dataset file."""
    with h5py.File(path, "r") as f:
        mask = f["loss_mask"][:] if "loss_mask" in f else None
        return f["tokens"][:], mask, f["doc_offsets"][:].astype(np.int64), dict(f.attrs)


def splits(path, seed, task, fractions=(0.8, 0.1, 0.1)):
    off = read(path)[2]
    D = len(off) - 1
    perm = list(range(D))
    r = Rng(seed, (1 << 56) | task)
    for i in range(D, 1, -1):
        j = r.below(i)
        perm[i - 1], perm[j] = perm[j], perm[i - 1]
    nt = max(1, min(D, llround(fractions[0] * D)))
    nv = min(llround(fractions[1] * D), D - nt)
    return [sorted(perm[:nt]), sorted(perm[nt:nt + nv]), sorted(perm[nt + nv:])]


def split_tokens(path, docs):
    off = read(path)[2]
    return int(sum(off[d + 1] - off[d] for d in docs))
