"""ref_export_files.py — final/ and `shardtune export` give a directory a user can run and serve.

Source: a Qwen3 model directory as transformers 5 writes it — config.json by Qwen3Config.save_pretrained
(dtype bfloat16, yarn RoPE in rope_parameters, pad/bos/eos ids), bf16 weights (safetensors' torch writer),
tokenizer.json / tokenizer_config.json / chat_template.jinja by PreTrainedTokenizerFast.save_pretrained,
generation_config.json by GenerationConfig.save_pretrained, and a special_tokens_map.json as older
exports carry it. After `shardtune train` on 2 ranks (3 steps, a checkpoint at step 3):
 1. final/ and `shardtune export CKPT --out DIR` both hold every source file byte for byte (tokenizer,
    chat template, special tokens, generation config) and config.json byte for byte equal to the source's
    (rope_parameters, dtype, architectures, pad_token_id as the user had them); transformers' AutoConfig,
    AutoTokenizer and GenerationConfig load them back with the source's values, the tokenizer encodes a
    text exactly as the source's does and renders the same chat template.
 2. the weights are stored as BF16 (the source dtype), every tensor name/shape of the source, and the two
    exports are bit-identical (final weights == the step-3 checkpoint's).
 3. the export evaluates back: shardtune's loss on it (tests/tools/ref_model) equals the float64 torch
    reference on the same bf16 weights within 1e-5 at T = 128.
 4. tie_word_embeddings: true with an lm_head.weight that differs from the embeddings: like transformers
    5 (modeling_utils.tie_weights: "both are present ... with different values, so we will NOT tie them")
    the model runs untied — its loss equals the untied float64 reference — and `shardtune eval` says so
    in one warning line.
Env (set by ctest): SHARDTUNE_BIN, ST_BUILD_DIR."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402
from torch_model import RefModel, param_shapes, parse_config, weighted_ce  # noqa: E402

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaConfig, PreTrainedTokenizerFast  # noqa: E402
from transformers import Qwen3Config  # noqa: E402

torch.set_num_threads(2)
BIN = os.environ.get("SHARDTUNE_BIN", "build/shardtune")
REF_MODEL = os.path.join(os.environ.get("ST_BUILD_DIR", "build"), "ref_model")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
           OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
V, T = 64, 128
ASSETS = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
          "generation_config.json"]
failures = []


def check(what, ok, msg=""):
    print(f"  {'ok  ' if ok else 'FAIL'} {what}{': ' + msg if msg else ''}", flush=True)
    if not ok:
        failures.append(what)


def run(args, ok=True):
    r = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    if ok:
        assert r.returncode == 0, f"{' '.join(args[:3])} failed: {r.stdout}\n{r.stderr}"
    return r


def header(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}


def make_source(d, rng):
    os.makedirs(d)
    Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, vocab_size=V, max_position_embeddings=256,
                tie_word_embeddings=False, bos_token_id=61, eos_token_id=62, pad_token_id=63, dtype="bfloat16",
                rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 2.0,
                                 "original_max_position_embeddings": 128}).save_pretrained(d)
    c = parse_config(json.load(open(os.path.join(d, "config.json"))))
    w = {}
    for name, shape in param_shapes(c).items():
        if len(shape) == 2:
            w[name] = rng.normal(0, 0.1, shape)
        else:
            w[name] = (3.0 if "_norm" in name and "layernorm" not in name else 1.0) + rng.normal(0, 0.1, shape)
    save_file({k: torch.tensor(v, dtype=torch.float32).to(torch.bfloat16) for k, v in w.items()},
              os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    vocab = {f"t{i}": i for i in range(60)}
    vocab.update({"<unk>": 60, "<s>": 61, "</s>": 62, "<pad>": 63})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>")
    t.chat_template = "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
    t.save_pretrained(d)
    GenerationConfig(bos_token_id=61, eos_token_id=[62, 61], pad_token_id=63, do_sample=False,
                     max_new_tokens=7).save_pretrained(d)
    with open(os.path.join(d, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, f)
    for a in ASSETS:
        assert os.path.exists(os.path.join(d, a)), a


def train(tmp, src, rng):
    with open(os.path.join(tmp, "docs.jsonl"), "w") as f:
        for _ in range(40):
            f.write(json.dumps({"input_ids": rng.integers(0, 60, int(rng.integers(20, 60))).tolist()}) + "\n")
    data = os.path.join(tmp, "train.h5")
    run([BIN, "data", "pack", "--jsonl", os.path.join(tmp, "docs.jsonl"), "--out", data, "--vocab", str(V)])
    run_dir = os.path.join(tmp, "run")
    with open(os.path.join(tmp, "job.yaml"), "w") as f:
        f.write(f"model: {{ path: {src} }}\nrun_dir: {run_dir}\nseed: 3\n"
                "train: { steps: 3, micro_batch: 1, grad_accum: 1, seq_len: 32, lr: 1.0e-3, warmup_steps: 0, "
                "log_every: 1000 }\nsharding: { stage: 1 }\n"
                f"tasks: [ {{ name: t, path: {data} }} ]\neval: {{ every_steps: 0 }}\n"
                "checkpoint: { every_steps: 3, keep_last: 0 }\nmonitor: { publish: \"\", control: \"\" }\n")
    run(["mpirun", "--oversubscribe", "-np", "2", BIN, "train", os.path.join(tmp, "job.yaml")])
    return run_dir


def check_dir(label, d, src):
    for a in ASSETS + ["config.json"]:
        same = os.path.exists(os.path.join(d, a)) and open(os.path.join(d, a), "rb").read() == \
            open(os.path.join(src, a), "rb").read()
        check(f"{label} {a} equals the source's", same)
    cfg, cfg0 = AutoConfig.from_pretrained(d), AutoConfig.from_pretrained(src)
    check(f"{label} config loads in transformers", cfg.model_type == "qwen3" and
          cfg.rope_parameters == cfg0.rope_parameters and str(cfg.dtype) == str(cfg0.dtype) and
          cfg.pad_token_id == 63 and cfg.architectures == cfg0.architectures,
          f"rope {cfg.rope_parameters}, dtype {cfg.dtype}, pad {cfg.pad_token_id}")
    tk, tk0 = AutoTokenizer.from_pretrained(d), AutoTokenizer.from_pretrained(src)
    text = "t1 t5 t59 t3 zzz"
    msgs = [{"role": "user", "content": "t1 t2"}]
    check(f"{label} tokenizer and chat template", tk(text)["input_ids"] == tk0(text)["input_ids"] and
          tk.apply_chat_template(msgs, tokenize=False) == tk0.apply_chat_template(msgs, tokenize=False),
          f"ids {tk(text)['input_ids']}")
    g = GenerationConfig.from_pretrained(d)
    check(f"{label} generation config", g.eos_token_id == [62, 61] and g.pad_token_id == 63 and
          g.max_new_tokens == 7, f"eos {g.eos_token_id}")
    h, h0 = header(os.path.join(d, "model.safetensors")), header(os.path.join(src, "model.safetensors"))
    check(f"{label} weights BF16 with the source's names and shapes",
          all(e["dtype"] == "BF16" for e in h.values()) and
          {k: e["shape"] for k, e in h.items()} == {k: e["shape"] for k, e in h0.items()},
          f"{len(h)} tensors, dtypes {sorted(set(e['dtype'] for e in h.values()))}")


def loss_vs_reference(label, d, tmp, rng, ref_config=None):
    inputs = rng.integers(0, V, (2, T)).astype(np.int32)
    targets = rng.integers(0, V, (2, T)).astype(np.int32)
    weight = np.full((2, T), 1.0 / (2 * T), np.float32)
    tag = "".join(ch if ch.isalnum() else "_" for ch in label)
    bp, op = os.path.join(tmp, f"{tag}.b.safetensors"), os.path.join(tmp, f"{tag}.o.safetensors")
    st_io.write(bp, {"inputs": inputs, "targets": targets, "weight": weight})
    run([REF_MODEL, "--model", d, "--batch", bp, "--out", op])
    ours = float(st_io.read(op)["loss"][0])
    config = ref_config or json.load(open(os.path.join(d, "config.json")))
    ref = RefModel(config, st_io.read_model(d), torch.float64)
    loss, _ = weighted_ce(ref.logits(torch.from_numpy(inputs).long()), torch.from_numpy(targets),
                          torch.from_numpy(weight))
    e = abs(ours - loss.item()) / loss.item()
    check(f"{label} loss equals the float64 reference", e <= 1e-5, f"ours {ours:.8f} ref {loss.item():.8f} rel {e:.1e}")
    return ours


def check_tied_mismatch(tmp, rng):
    d = os.path.join(tmp, "tied")
    LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=V, max_position_embeddings=256, tie_word_embeddings=True).save_pretrained(d)
    config = json.load(open(os.path.join(d, "config.json")))
    untied = dict(config, tie_word_embeddings=False)
    w = {k: rng.normal(0, 0.2, s).astype(np.float32) if len(s) == 2 else np.ones(s, np.float32)
         for k, s in param_shapes(parse_config(untied)).items()}
    st_io.write(os.path.join(d, "model.safetensors"), w)
    loss_vs_reference("tied config, different lm_head", d, tmp, rng, ref_config=untied)
    ids = rng.integers(0, V, 400).tolist()
    with open(os.path.join(tmp, "tied.jsonl"), "w") as f:
        f.write(json.dumps({"input_ids": ids}) + "\n")
    data = os.path.join(tmp, "tied.h5")
    run([BIN, "data", "pack", "--jsonl", os.path.join(tmp, "tied.jsonl"), "--out", data, "--vocab", str(V)])
    r = run([BIN, "eval", "--model", d, "--data", data, "--seq-len", "16", "--json"])
    warn = [l for l in r.stderr.splitlines() if "warning" in l]
    check("tied mismatch: one warning line naming it", len(warn) == 1 and "lm_head.weight differs" in warn[0],
          warn[0] if warn else r.stderr.strip())


def main():
    rng = np.random.default_rng(4)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "qwen3_src")
        make_source(src, rng)
        run_dir = train(tmp, src, rng)
        final, exp = os.path.join(run_dir, "final"), os.path.join(tmp, "exported")
        run([BIN, "export", os.path.join(run_dir, "checkpoints"), "--out", exp])
        check_dir("final/", final, src)
        check_dir("export", exp, src)
        same = open(os.path.join(final, "model.safetensors"), "rb").read() == \
            open(os.path.join(exp, "model.safetensors"), "rb").read()
        check("final/ and export weights bit-identical", same)
        src_w, fin_w = st_io.read_model(src), st_io.read_model(final)
        moved = max(float(np.abs(fin_w[k] - src_w[k]).max()) for k in src_w)
        check("training changed the weights", moved > 0, f"max change {moved:.2e}")
        loss_vs_reference("final/", final, tmp, rng)
        check_tied_mismatch(tmp, rng)
    if failures:
        print(f"FAILED: {len(failures)} checks: {', '.join(failures)}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
