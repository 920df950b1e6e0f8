"""lora_masks.py — LoRA dropout's keep masks recomputed in numpy from the key worker/lora.h documents (seed,
step, global sample, position, adapter, feature), written independently of worker/lora.c; shared by
peft_adapters.py (against the real peft) and test_bf16_torch.py (the bf16 emulation)."""
import numpy as np


def mix64(z):
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic), as worker/lora.c's mask hash."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def dropout_mask(p, seed, step, sample, k, B, T, n_in):
    """Adapter k's keep/(1-p) mask [B, T, in] (k: the adapter's index in registry order)."""
    u = np.uint64
    key = mix64(np.array([seed ^ 0x4C6F5241], u))
    key = mix64(key ^ u(step))
    rows = np.arange(B * T, dtype=np.uint64)
    with np.errstate(over="ignore"):
        rk = mix64(key ^ mix64((u(sample) + rows // u(T)) * u(0x9E3779B97F4A7C15) + rows % u(T)))
        rk = mix64(rk ^ u(k))
        h = mix64(rk[:, None] + np.arange(n_in, dtype=np.uint64)[None, :])
    keep = h >= u(int(p * 2.0 ** 64))
    return (keep / (1.0 - p)).reshape(B, T, n_in)
