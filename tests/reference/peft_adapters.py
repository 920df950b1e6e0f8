"""peft_adapters.py — adapters trained by shardtune against the REAL `peft` library and transformers' own
Llama / GPT-2 modules (PyPI torch 2.x; run with `scripts/pyref --torch`, tests/requirements-torch.txt).

For each mode: LoRA (Llama, all seven projections), LoRA with lora_dropout 0.1 (trained with dropout; peft in
eval mode, as `eval` runs without dropout; and one training forward/backward with ref_model --lora-dropout
against peft's modules with each lora_dropout replaced by the same masks, recomputed here in numpy from the
hash worker/lora.h documents), LoRA (GPT-2 c_attn/c_proj/c_fc Conv1D, rsLoRA), DoRA
(Llama q/v/down; and with lora_dropout 0.1 on q/v/o/down, its training forward/backward against peft's
DoRA with the same masks as LoRA dropout's), QLoRA (Llama nf4 + double quantization), prompt tuning, P-tuning (MLP encoder; LSTM encoder on Llama) and
prefix tuning with and without projection (Llama and GPT-2 each), a small model
(T = 128, q/k weights scaled x4 so attention is sharp, as test_lora_torch.py) trains 3 steps with
`shardtune train` on one rank; then
 1. transformers' model (float64, eager attention) + PeftModel.from_pretrained(base, RUN_DIR/final) gives
    the same loss as `shardtune eval --model BASE --adapter final` over the eval contract's windows
    (T + 1 tokens, stride T, loss_mask of the packed file): 1e-5 relative, same target count;
 2. at that fixed point (the trained adapter), the adapter gradients of one batch from tests/tools/ref_model
    --adapter equal torch autograd through the peft modules (PeftModel.from_pretrained(..., is_trainable)):
    rel = max|ours - ref| / max|ref| <= max(1e-5, that tensor's fp32 error bound): fp32_error.py runs the same
    float64 peft model with every op's worst-case fp32 error for any summation order (gamma_k |A||B| for a
    k-term product, ...), so the bound follows from the arithmetic, not from one fp32 library's summation
    order (sharp attention at T = 128 amplifies fp32 rounding past 1e-5); every trainable peft tensor has
    its gradient and shardtune dumps no other.
P-tuning: final/ holds the encoder's output (as peft saves it); the encoder itself (the run's last checkpoint,
written as a P_TUNING directory of its 7 tensors) gives ref_model gradients equal to autograd through peft's
PromptEncoder with an MLP head, and peft's saved table from it equals final/'s.
Prefix tuning: peft's past_key_values (a V-long cache, positions V.., the attention mask widened by V); with
prefix_projection the encoder (embedding, Linear, Tanh, Linear) is checked as P-tuning's is.
QLoRA: bitsandbytes is not available, so peft's LoRA runs on the base as shardtune dequantizes it (ref_model
--qlora nf4-dq dumps dequant.<name>); the eval loss is checked on the full-precision base, which is what
`eval --adapter` applies a peft LoRA directory to.
Refusals: PREFIX_TUNING without peft's GQA token_dim, another num_layers, a P_TUNING table of the wrong shape.
The packed eval file is read with Debian's h5py through ST_PYTHON (this venv does not see Debian's packages).
Env (set by ctest): SHARDTUNE_BIN, ST_BUILD_DIR, ST_PYTHON."""
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402
import fp32_error  # noqa: E402
from lora_masks import dropout_mask  # noqa: E402
import st_io  # noqa: E402
from test_lora_torch import GPT2, LLAMA, sharp_weights  # noqa: E402
from torch_model import parse_config  # noqa: E402

import peft  # noqa: E402

ONLY = os.environ.get("ST_PEFT_CASES", "")  # a comma-separated subset of the case names (debugging)
import transformers  # noqa: E402

torch.set_num_threads(2)
BUILD = os.environ.get("ST_BUILD_DIR", "build")
REF_MODEL = os.path.join(BUILD, "ref_model")
T, TOL = 128, 1e-5
LLAMA_T = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = [  # name, config, finetune yaml, ref_model extra args
    ("llama_lora", LLAMA, "{ mode: lora, lora: { r: 4, alpha: 8 } }", []),
    ("llama_lora_dropout", LLAMA, "{ mode: lora, lora: { r: 4, alpha: 8, dropout: 0.1, targets: [q_proj, v_proj, up_proj] } }",
     []),
    ("gpt2_lora_rslora", GPT2, "{ mode: lora, lora: { r: 4, alpha: 8, rslora: true, targets: [c_attn, c_proj, c_fc] } }",
     []),
    ("llama_dora", LLAMA, "{ mode: lora, lora: { r: 2, alpha: 4, dora: true, targets: [q_proj, v_proj, down_proj] } }",
     []),
    ("llama_dora_dropout", LLAMA,
     "{ mode: lora, lora: { r: 2, alpha: 4, dora: true, dropout: 0.1, targets: [q_proj, v_proj, o_proj, down_proj] } }",
     []),
    ("llama_qlora_nf4dq", LLAMA,
     "{ mode: qlora, lora: { r: 4, alpha: 8 }, qlora: { quant: nf4, double_quant: true, block: 64 } }",
     ["--qlora", "nf4-dq", "--qblock", "64"]),
    ("llama_prompt", LLAMA, "{ mode: prompt_tuning, prompt: { virtual_tokens: 6 } }", []),
    ("gpt2_prompt", GPT2, "{ mode: prompt_tuning, prompt: { virtual_tokens: 5 } }", []),
    ("llama_ptuning", LLAMA, "{ mode: p_tuning, prompt: { virtual_tokens: 4, encoder: mlp } }", []),
    ("gpt2_ptuning", GPT2, "{ mode: p_tuning, prompt: { virtual_tokens: 5 } }", []),
    ("llama_ptuning_lstm", LLAMA, "{ mode: p_tuning, prompt: { virtual_tokens: 4, encoder: lstm } }", []),
    ("llama_prefix", LLAMA, "{ mode: prefix_tuning, prefix: { virtual_tokens: 6 } }", []),
    ("gpt2_prefix", GPT2, "{ mode: prefix_tuning, prefix: { virtual_tokens: 5 } }", []),
    ("llama_prefix_proj", LLAMA, "{ mode: prefix_tuning, prefix: { virtual_tokens: 4, projection: true } }", []),
    ("gpt2_prefix_proj", GPT2, "{ mode: prefix_tuning, prefix: { virtual_tokens: 3, projection: true } }", []),
]
failures = []


def check(what, ok, msg):
    print(f"  {'ok  ' if ok else 'FAIL'} {what}: {msg}")
    if not ok:
        failures.append(what)


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-300)


def read_packed(path):
    """/tokens and /loss_mask of a packed file, via Debian's python + h5py (ST_PYTHON)."""
    code = ("import h5py, numpy as np, sys, io\nf = h5py.File(sys.argv[1], 'r')\nb = io.BytesIO()\n"
            "np.savez(b, tokens=f['tokens'][:], mask=f['loss_mask'][:])\nsys.stdout.buffer.write(b.getvalue())\n")
    r = subprocess.run([os.environ.get("ST_PYTHON", "/usr/bin/python3"), "-c", code, path], capture_output=True,
                       check=True)
    z = np.load(io.BytesIO(r.stdout))
    return z["tokens"].astype(np.int64), z["mask"].astype(np.float64)


def make_model(tmp, name, config, rng, tensors=None):
    c = parse_config(config)
    d = os.path.join(tmp, name)
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    st_io.write(os.path.join(d, "model.safetensors"), tensors if tensors is not None else sharp_weights(c, rng))
    return c, d


def make_data(path, vocab, rng, docs, lo, hi):
    with open(path + ".jsonl", "w") as f:
        for _ in range(docs):
            n = int(rng.integers(lo, hi))
            ids = rng.integers(0, vocab, n).tolist()
            labels = [-100 if i < 3 or rng.random() < 0.1 else t for i, t in enumerate(ids)]
            f.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")
    dp.sh([dp.BIN, "data", "pack", "--jsonl", path + ".jsonl", "--out", path, "--vocab", str(vocab)])
    return path


def train(tmp, name, mdir, data, finetune):
    rd = os.path.join(tmp, name + "_run")
    job = dp.write_job(os.path.join(tmp, name + ".yaml"), mdir, rd, [{"name": "a", "path": data}],
                       "finetune: " + finetune + "\n")
    dp.train(job, 1, ["train.steps=3", "train.micro_batch=2", f"train.seq_len={T}", "train.lr=2.0e-2",
                      "train.warmup_steps=0", "train.schedule=constant"], mpirun=False, timeout=300)
    return os.path.join(rd, "final")


def hf_model(mdir, config, dtype):
    cls = transformers.GPT2LMHeadModel if config["model_type"] == "gpt2" else transformers.LlamaForCausalLM
    m = cls.from_pretrained(mdir, dtype=dtype, attn_implementation="eager")
    return m.to(dtype)


def peft_model(mdir, config, adir, dtype, trainable):
    m = peft.PeftModel.from_pretrained(hf_model(mdir, config, dtype), adir, is_trainable=trainable)
    m.to(dtype)
    m.train(False)  # no dropout anywhere
    return m


def real_logits(m, ids):
    """Logits of the real positions (prompt learning puts the virtual rows first)."""
    out = m(input_ids=ids).logits
    nv = m.peft_config["default"].num_virtual_tokens if m.peft_config["default"].is_prompt_learning else 0
    return out[:, nv:, :] if m.peft_config["default"].peft_type != peft.PeftType.PREFIX_TUNING else out


def ce_sum(logits, targets, w):
    lp = torch.log_softmax(logits, dim=-1)
    nll = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (nll * w).sum()


def check_eval(name, mdir, config, adir, data):
    tokens, mask = read_packed(data)
    nw = (len(tokens) - 1) // T
    idx = np.arange(nw)[:, None] * T + np.arange(T)[None, :]
    m = peft_model(mdir, config, adir, torch.float64, False)
    with torch.no_grad():
        w = torch.from_numpy(mask[idx + 1])
        ref = ce_sum(real_logits(m, torch.from_numpy(tokens[idx])), torch.from_numpy(tokens[idx + 1]), w).item()
    ref, n = ref / w.sum().item(), int(w.sum().item())
    out = dp.sh([dp.BIN, "eval", "--model", mdir, "--adapter", adir, "--data", data, "--seq-len", str(T), "--json"])
    ours = json.loads(out.stdout.strip().splitlines()[-1])
    base = json.loads(dp.sh([dp.BIN, "eval", "--model", mdir, "--data", data, "--seq-len", str(T), "--json"]
                            ).stdout.strip().splitlines()[-1])["loss"]
    e = abs(ours["loss"] - ref) / abs(ref)
    check(f"{name} eval --adapter == peft", e <= TOL and ours["tokens"] == n,
          f"ours {ours['loss']:.9f} peft {ref:.9f} rel {e:.2e}, targets {ours['tokens']} vs {n} ({nw} windows)")
    # the adapter is not a no-op: it moves the loss well past the ours-vs-peft difference (3 steps from peft's
    # init move a bounded-output encoder's prompt only a little, so no fixed size is asked)
    moved = abs(base - ref)
    check(f"{name} the adapter changes the loss", moved > 1e-6 * abs(ref) and moved > 10 * abs(ours["loss"] - ref),
          f"base {base:.9f}, moved {moved:.2e}")


def peft_grads(mdir, config, adir, batch, dtype, encoder=None, ctx=None):
    """Loss and {name: gradient} of every trainable peft tensor, the forward and backward inside `with ctx`
    (fp32_error.bound's error model; the model is built outside it). encoder: a P-tuning encoder's tensors
    (shardtune's registry names): a trainable PromptEncoder (MLP head) is built with get_peft_model and
    loaded with them instead of reading adir."""
    if encoder is not None:
        V, C = encoder["prompt_encoder.embedding.weight"].shape
        if "prompt_encoder.transform.0.weight" in encoder:  # prefix projection (hidden size: peft's default)
            pc = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=V, prefix_projection=True)
        else:
            lstm = "prompt_encoder.lstm_head.weight_ih_l0" in encoder
            pc = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=V, encoder_hidden_size=C,
                                          encoder_reparameterization_type="LSTM" if lstm else "MLP")
        m = peft.get_peft_model(hf_model(mdir, config, dtype), pc)
        m.to(dtype)
        sd = {k.replace("prompt_encoder.", "", 1): torch.from_numpy(v.astype(np.float64)).to(dtype)
              for k, v in encoder.items()}
        m.prompt_encoder["default"].load_state_dict(sd, strict=True)
        m.train(False)
    else:
        prompt = json.load(open(os.path.join(adir, "adapter_config.json")))["peft_type"] != "LORA"
        # peft refuses is_trainable for a prompt-learning adapter: load it for inference, then train its table
        m = peft_model(mdir, config, adir, dtype, not prompt)
        if prompt:
            m.prompt_encoder["default"].embedding.weight.requires_grad_(True)
    ids, tg = torch.from_numpy(batch["inputs"]).long(), torch.from_numpy(batch["targets"]).long()
    with ctx or contextlib.nullcontext():
        loss = ce_sum(real_logits(m, ids), tg, torch.from_numpy(batch["weight"]).to(dtype))
        loss.backward()
    out = {}
    for k, p in m.named_parameters():
        if p.requires_grad:
            key = k.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
            # ref_model dumps the HF names of the adapted modules (no "base_model.model.", GPT-2 without
            # "transformer.")
            key = key.replace("base_model.model.", "", 1)
            key = key[len("transformer."):] if key.startswith("transformer.") else key
            if key == "prompt_encoder.embedding.weight" and encoder is None:
                key = "prompt_embeddings"
            out[key] = p.grad.detach().numpy().astype(np.float64)
    if encoder is not None and ctx is None:  # the table peft would save: equal to final/'s prompt_embeddings
        with torch.no_grad():
            out["table"] = m.get_prompt_embedding_to_save("default").numpy().astype(np.float64)
    return loss.item(), out


def last_checkpoint_model(run_dir):
    """/model/* of the run's last checkpoint, via Debian's python + h5py (ST_PYTHON)."""
    ck = os.path.join(run_dir, "checkpoints")
    last = os.path.join(ck, sorted(f for f in os.listdir(ck) if f.endswith(".h5"))[-1])
    code = ("import h5py, numpy as np, sys, io\nf = h5py.File(sys.argv[1], 'r')\nb = io.BytesIO()\n"
            "np.savez(b, **{k: f['model'][k][:] for k in f['model'].keys()})\nsys.stdout.buffer.write(b.getvalue())\n")
    r = subprocess.run([os.environ.get("ST_PYTHON", "/usr/bin/python3"), "-c", code, last], capture_output=True,
                       check=True)
    z = np.load(io.BytesIO(r.stdout))
    return {k: z[k] for k in z.files}


def check_encoder(name, tmp, mdir, config, adir, rng):
    """P-tuning and prefix projection: the trained encoder (the run's last checkpoint) written as a P_TUNING directory holding the
    encoder's tensors: ref_model's gradients of all of them equal autograd through peft's PromptEncoder (MLP) /
    PrefixEncoder (projection), and
    peft's saved table from it equals final/'s prompt_embeddings."""
    enc = last_checkpoint_model(os.path.dirname(adir))
    d = os.path.join(tmp, name + "_encoder")
    os.makedirs(d)
    st_io.write(os.path.join(d, "adapter_model.safetensors"), {k: v.astype(np.float32) for k, v in enc.items()})
    cfg = json.load(open(os.path.join(adir, "adapter_config.json")))
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(dict(cfg, inference_mode=False), f)
    check_grads(name + "_encoder", tmp, mdir, config, d, [], rng, encoder=enc)


def check_grads(name, tmp, mdir, config, adir, extra, rng, encoder=None):
    c = parse_config(config)
    B = 2
    w = np.where(rng.random((B, T)) >= 0.3, 1.0, 0.0)
    batch = {"inputs": rng.integers(0, c["vocab"], (B, T)).astype(np.int32),
             "targets": rng.integers(0, c["vocab"], (B, T)).astype(np.int32), "weight": (w / w.sum()).astype(np.float32)}
    bpath = os.path.join(tmp, name + "_batch.safetensors")
    st_io.write(bpath, batch)
    out = os.path.join(tmp, name + "_ref.safetensors")
    dp.sh([REF_MODEL, "--model", mdir, "--batch", bpath, "--out", out, "--adapter", adir, *extra], timeout=300)
    ours = st_io.read(out)
    if extra:  # QLoRA: peft's LoRA over the base exactly as shardtune dequantized it
        base = st_io.read(os.path.join(mdir, "model.safetensors"))
        for k, v in ours.items():
            if k.startswith("dequant."):
                base[k[len("dequant."):]] = v.astype(np.float32)
        _, mdir = make_model(tmp, name + "_dequant", config, rng, base)
    if encoder is not None:
        _, full = peft_grads(mdir, config, adir, batch, torch.float64, encoder)
        final = st_io.read(os.path.join(adir.replace("_encoder", "_run/final"), "adapter_model.safetensors"))
        e = rel_err(final["prompt_embeddings"], full["table"])
        check(f"{name} final/ prompt_embeddings == peft's saved table", e <= TOL, f"rel {e:.2e}")
    loss, ref, bnd = fp32_error.bound(lambda ctx: peft_grads(mdir, config, adir, batch, torch.float64, encoder, ctx))
    compare(name, "", ours, loss, ref, bnd)


def compare(name, what, ours, loss, ref, bnd):
    """ours (ref_model's dump) against the float64 loss and gradients, each within max(TOL, its fp32 error
    bound: fp32_error.py, the same model with every op's worst-case fp32 error for any summation order)."""
    e = abs(float(ours["loss"][0]) - loss) / abs(loss)
    check(f"{name}{what} batch loss == peft", e <= max(TOL, bnd["loss"]), f"rel {e:.2e} (fp32 bound {bnd['loss']:.2e})")
    got = {k[len("grad."):] for k in ours if k.startswith("grad.")}
    check(f"{name}{what} gradients of exactly peft's trainable tensors", got == set(ref),
          f"{len(got)} vs {len(ref)}: ours only {sorted(got - set(ref))[:2]}, peft only {sorted(set(ref) - got)[:2]}")
    worst, bad = (0.0, ""), []
    for k in sorted(got & set(ref)):
        e = rel_err(ours["grad." + k], ref[k])
        worst = max(worst, (e / max(TOL, bnd[k]), f"{k} rel {e:.2e} of bound {max(TOL, bnd[k]):.2e}"))
        if e > max(TOL, bnd[k]):
            bad.append(f"{k} rel {e:.2e} > bound {bnd[k]:.2e}")
    check(f"{name}{what} adapter gradients == peft autograd", not bad,
          f"{len(ref)} tensors, closest to its bound: {worst[1]} {bad[:3]}")


class MaskDropout(torch.nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask.to(x.dtype)


def check_dropout_grads(name, tmp, mdir, config, adir, rng, p=0.1, seed=3, step=5, sample=40):
    """LoRA dropout in a training forward: ref_model --lora-dropout (the masks of worker/lora.h) against
    peft's LoRA modules with each lora_dropout replaced by the same mask (peft applies dropout to the adapter
    input only: lora_B(lora_A(dropout(x)))): loss and every adapter gradient. DoRA: peft's DoraLinearVariant in a
    training module runs the whole DoRA term on dropout(x) (its base term F.linear(dropout(x), W) too, one mask);
    the adapted modules are put in training mode for that (nothing else of the model has dropout)."""
    c = parse_config(config)
    B = 2
    w = np.where(rng.random((B, T)) >= 0.3, 1.0, 0.0)
    batch = {"inputs": rng.integers(0, c["vocab"], (B, T)).astype(np.int32),
             "targets": rng.integers(0, c["vocab"], (B, T)).astype(np.int32), "weight": (w / w.sum()).astype(np.float32)}
    bpath = os.path.join(tmp, name + "_dbatch.safetensors")
    st_io.write(bpath, batch)
    out = os.path.join(tmp, name + "_dref.safetensors")
    dp.sh([REF_MODEL, "--model", mdir, "--batch", bpath, "--out", out, "--adapter", adir,
           "--lora-dropout", f"{p},{seed},{step},{sample}"], timeout=300)
    ours = st_io.read(out)
    order = [k[len("grad."):-len(".lora_A.weight")] for k in ours if k.endswith(".lora_A.weight")]  # adapter order

    def run(ctx, dtype=torch.float64):
        m = peft_model(mdir, config, adir, dtype, True)
        for k, mod in enumerate(order):
            layer = m.get_submodule("base_model.model." + mod)
            n_in = layer.lora_A["default"].in_features
            layer.lora_dropout["default"] = MaskDropout(torch.from_numpy(
                dropout_mask(p, seed, step, sample, k, B, T, n_in)))
            layer.train(True)  # DoRA applies lora_dropout only in training (variants.py DoraLinearVariant)
        ids, tg = torch.from_numpy(batch["inputs"]).long(), torch.from_numpy(batch["targets"]).long()
        with ctx:
            loss = ce_sum(real_logits(m, ids), tg, torch.from_numpy(batch["weight"]).to(dtype))
            loss.backward()
        return loss.item(), {k.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
                             .replace("base_model.model.", "", 1): q.grad.numpy()
                             for k, q in m.named_parameters() if q.requires_grad}

    loss, ref, bnd = fp32_error.bound(run)
    _, plain = peft_grads(mdir, config, adir, batch, torch.float64)
    compare(name, " dropout (peft with the same masks)", ours, loss, ref, bnd)
    moved = max(rel_err(plain[k], ref[k]) for k in ref)
    per = 3 if any(k.endswith("lora_magnitude_vector") for k in ref) else 2  # DoRA: A, B and the magnitude
    check(f"{name} dropout changes every adapter gradient", len(ref) == len(order) * per and moved > 1e-3,
          f"{len(ref)} tensors; without dropout they differ by {moved:.2e}")


def refusals(tmp, rng):
    """Prompt-learning directories that do not fit the model: one line naming the field, non-zero exit."""
    print("refusals")
    c, mdir = make_model(tmp, "refusal_base", LLAMA, rng)
    kvd = c["n_kv_head"] * c["head_dim"]
    base = dict(task_type="CAUSAL_LM", num_virtual_tokens=3, num_transformer_submodules=1, num_layers=c["n_layer"])
    cases = [
        ("prefix token_dim without peft's GQA rule", dict(base, peft_type="PREFIX_TUNING", token_dim=c["d_model"],
                                                          num_attention_heads=c["n_head"]),
         (3, 2 * c["n_layer"] * c["d_model"]), "token_dim"),
        ("prefix num_layers", dict(base, peft_type="PREFIX_TUNING", token_dim=kvd, num_attention_heads=c["n_kv_head"],
                                   num_layers=c["n_layer"] + 1), (3, 2 * (c["n_layer"] + 1) * kvd), "num_layers"),
        ("p_tuning table shape", dict(base, peft_type="P_TUNING", token_dim=c["d_model"]), (4, c["d_model"]),
         "prompt_embeddings has shape"),
    ]
    data = make_data(os.path.join(tmp, "refusal.h5"), c["vocab"], rng, 2, 150, 200)
    for what, cfg, shape, needle in cases:
        d = os.path.join(tmp, "bad_" + what.replace(" ", "_").replace("'", ""))
        os.makedirs(d)
        st_io.write(os.path.join(d, "adapter_model.safetensors"), {"prompt_embeddings": np.zeros(shape, np.float32)})
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump(cfg, f)
        r = dp.sh([dp.BIN, "eval", "--model", mdir, "--adapter", d, "--data", data, "--seq-len", str(T)], check=False)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        check(f"refuses {what}", r.returncode != 0 and len(lines) == 1 and needle in lines[0], repr(r.stderr.strip()))


def main():
    rng = np.random.default_rng(5)
    with tempfile.TemporaryDirectory() as tmp:
        for name, config, finetune, extra in CASES:
            if ONLY and name not in ONLY.split(","):
                continue
            print(name)
            c, mdir = make_model(tmp, name + "_base", config, rng)
            data = make_data(os.path.join(tmp, name + "_train.h5"), c["vocab"], rng, 20, 150, 300)
            evald = make_data(os.path.join(tmp, name + "_eval.h5"), c["vocab"], rng, 4, 150, 300)
            adir = train(tmp, name, mdir, data, finetune)
            check_eval(name, mdir, config, adir, evald)
            check_grads(name, tmp, mdir, config, adir, extra, rng)
            if "dropout" in name:
                check_dropout_grads(name, tmp, mdir, config, adir, rng)
            if "ptuning" in name or "proj" in name:
                check_encoder(name, tmp, mdir, config, adir, rng)
        if not ONLY or "refusals" in ONLY.split(","):
            refusals(tmp, rng)
    if failures:
        print("FAILED:", failures)
        sys.exit(1)
    print("all peft reference checks passed")


if __name__ == "__main__":
    main()
