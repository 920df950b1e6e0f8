"""hf_train.py — the PyPI-PyTorch side of bench/cpu_train: trains Hugging Face transformers' own
LlamaForCausalLM / GPT2LMHeadModel, built from a config with the row's shapes (random init), on random
tokens, fp32, AdamW (betas 0.9/0.95) + clip_grad_norm_(1.0), with a fixed number of threads, eager or
torch.compile'd, and prints one JSON line: median step time after warm-up and tokens/s.

Runs in the bench's own virtual environment (bench/torch_venv.sh: torch 2.x + transformers from PyPI):
  $(bench/torch_venv.sh) bench/hf_train.py --family llama --layers 4 --dim 256 --heads 4 --kv-heads 2 \
      --ffn 688 --vocab 32000 --batch 8 --seq 128 --mode compile
The loss is the plain next-token cross-entropy over the T positions (logits from the model, targets the
shifted tokens), as shardtune and bench/torch_train.py compute it; no dropout.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
import transformers


def build(a):
    if a.family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=a.vocab, n_positions=a.seq, n_embd=a.dim, n_layer=a.layers,
                                      n_head=a.heads, n_inner=a.ffn, activation_function="gelu_new",
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                                      tie_word_embeddings=True, use_cache=False)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.dim, intermediate_size=a.ffn,
                                   num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                   num_key_value_heads=a.kv_heads, max_position_embeddings=a.seq,
                                   rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False,
                                   attention_dropout=0.0, mlp_bias=False, tie_word_embeddings=False,
                                   use_cache=False)
    return transformers.LlamaForCausalLM(cfg)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--family", choices=["gpt2", "llama"], required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--heads", type=int, required=True)
    p.add_argument("--kv-heads", type=int, default=0)
    p.add_argument("--ffn", type=int, default=0)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=["eager", "compile"], default="eager")
    a = p.parse_args()
    a.kv_heads = a.kv_heads or a.heads
    a.ffn = a.ffn or 4 * a.dim
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = build(a).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)

    def loss_fn(x, y):
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))

    step_loss = torch.compile(loss_fn) if a.mode == "compile" else loss_fn
    g = torch.Generator().manual_seed(1)
    times, losses = [], []
    t_first = None
    for step in range(a.warmup + a.steps):
        tok = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = step_loss(tok[:, :-1].contiguous(), tok[:, 1:].contiguous())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if t_first is None:
            t_first = dt
        if step >= a.warmup:
            times.append(dt)
    med = statistics.median(times)
    print(json.dumps({"step_ms": med * 1e3, "tokens_per_s": a.batch * a.seq / med, "first_step_s": t_first,
                      "loss_first": losses[0], "loss_last": losses[-1], "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "transformers": transformers.__version__, "mode": a.mode}))


if __name__ == "__main__":
    main()
