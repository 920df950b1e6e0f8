"""The optimizer moments moved shard to shard at a progressive stage change under CPU ZeRO-3
and the weights moved from their old owners to their new ones (worker/comm.c reshard_moments,
reshard_weights) against the path before, which gathers the whole old moments and acquires every weight whole
on every rank and cuts the new shards from them (SHARDTUNE_ZERO3_RESHARD=whole). Both only copy values (and
widen bf16 to fp32, exactly), so the runs must
agree exactly: every dataset and attribute of every checkpoint (h5py), final/ byte for byte, the losses
(test_frozen_bf16.same_run).

Cases: a bf16 safetensors source (frozen parts held in bf16 only) progressive on 1, 2 and 3 ranks across its stage
change; an fp32 source by stages (layer_lr_decay, two changes) on 2 and 3 ranks in fp32 and on 3 in bf16, and by
unfreeze_every on 3 ranks (and on 2 with the frozen weights not sharded, SHARDTUNE_ZERO3_SHARD_FROZEN=0:
the weights acquired whole there); resumes at another world size across the changes (checkpoints at steps 2 and 4 of a
3-rank run, resumed on 2 ranks under each path).
"""
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402
import test_frozen_bf16 as fb  # noqa: E402
import test_frozen_bf16_zero3 as fz  # noqa: E402

WHOLE = {"SHARDTUNE_ZERO3_RESHARD": "whole"}
STAGES = ('finetune: { mode: progressive, layer_lr_decay: 0.8, stages: [ {at_step: 0, train_layers: "-1"},'
          ' {at_step: 3, train_layers: "-2"}, {at_step: 5, train_layers: "all"} ] }\n')
UNFREEZE = "finetune: { mode: progressive, unfreeze_every: 2 }\n"


def pair(root, tag, job, ranks, ov, env=None):
    """The job under both paths; returns the whole-path run dir."""
    a, b = os.path.join(root, tag + "_whole"), os.path.join(root, tag + "_moved")
    fb.run(job, ranks, ov + [f"run_dir={a}"], dict(WHOLE, **(env or {})))
    fb.run(job, ranks, ov + [f"run_dir={b}"], env)
    k = fb.same_run(a, b, tag)
    print(f"  {tag}: {k} checkpoints, final/, losses identical")
    return a


def main():
    t0 = time.time()
    root = dp.tmpdir("st_zero3_reshard_")
    try:
        _, jobs, common, _ = fz.setup(root)
        for ranks in (1, 2, 3):
            pair(root, f"bf16 source progressive {ranks} ranks", jobs["progressive"], ranks, common)
        model = dp.init_model(os.path.join(root, "f32b"), "llama", 3, dim=64, vocab=256, max_seq=64)
        data = os.path.join(root, "a.h5")
        job = dp.write_job(os.path.join(root, "st.yaml"), model, os.path.join(root, "x"), [{"name": "a", "path": data}], STAGES)
        ov = ["train.steps=7", "train.seq_len=16", "checkpoint.every_steps=2", "checkpoint.keep_last=5", "sharding.stage=3"]
        for ranks, prec in ((2, "fp32"), (3, "fp32"), (3, "bf16")):
            ref = pair(root, f"stages {prec} {ranks} ranks", job, ranks, ov + [f"precision={prec}", f"train.micro_batch={2 * ranks}"])
            if ranks == 3 and prec == "fp32":
                ck3 = ref
        for at in (2, 4):
            ck = os.path.join(ck3, "checkpoints", f"step-{at:08d}.h5")
            pair(root, f"stages resumed from step {at} (3 -> 2 ranks)", job, 2, ov + ["train.micro_batch=6", f"resume={ck}"])
        job = dp.write_job(os.path.join(root, "uf.yaml"), model, os.path.join(root, "x"), [{"name": "a", "path": data}], UNFREEZE)
        pair(root, "unfreeze_every 3 ranks", job, 3, ov + ["train.micro_batch=6"])
        # the frozen weights resident everywhere (no frozen space): the moments moved, the weights acquired whole
        pair(root, "unfreeze_every 2 ranks, frozen not sharded", job, 2, ov + ["train.micro_batch=6"],
             {"SHARDTUNE_ZERO3_SHARD_FROZEN": "0"})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"test_zero3_reshard: OK ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
