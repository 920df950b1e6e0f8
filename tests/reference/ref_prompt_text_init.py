"""Prompt tuning's TEXT init (finetune.prompt.init_text), against PyPI's tokenizers (scripts/pyref).

peft's PromptEmbedding with prompt_tuning_init TEXT takes tokenizer(init_text)["input_ids"] (special tokens
added), repeats the ids and cuts them to num_virtual_tokens, and copies those rows of the word embeddings.
Here: a BPE tokenizer.json built with `tokenizers` (a merge, so ids are not just characters, and a BOS from its post-processor) is put in a
Llama model's directory; a 1-step run at lr 1e-12 (AdamW moves each element by ~lr) leaves final/'s
prompt_embeddings equal to embed_tokens[ids repeated to V] within 1e-9, the ids being what `tokenizers`
encodes; adapter_config.json says prompt_tuning_init TEXT with the text and tokenizer_name_or_path (peft's
PromptTuningConfig requires it for TEXT). A model directory without tokenizer.json is refused with one line.
Under sharding.stage 3 (streamed load: each rank reads its parts, the rows assembled from the ranks' parts
of the embeddings after it) on 2 and 3 ranks: the same init (1e-9) and 4 steps' losses equal to the 1-rank
ZeRO-0 run (1e-6 relative: stage 3 sums the gradients in another order).
Env (set by ctest): SHARDTUNE_BIN."""
import json
import os
import shutil
import sys

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, processors

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402

V, TEXT = 7, "ab c abd"


def main():
    root = dp.tmpdir("st_prompt_text_")
    try:
        model = dp.init_model(os.path.join(root, "llama"), "llama", 2)
        bare = os.path.join(root, "bare")
        shutil.copytree(model, bare)
        vocab = {ch: i for i, ch in enumerate("abcdefgh")}
        vocab["ab"] = 8
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
        tok.pre_tokenizer = pre_tokenizers.Split(" ", "removed")
        vocab_bos = 9  # a BOS the post-processor adds: tokenizer(text) includes special tokens, as peft calls it
        tok.add_special_tokens(["<s>"])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab_bos)])
        tok.save(os.path.join(model, "tokenizer.json"))
        ids = tok.encode(TEXT).ids
        assert 8 in ids and ids[0] == vocab_bos and len(ids) < V, ids
        data = dp.make_dataset(os.path.join(root, "a.h5"), 128, 40, seed=1, step=1)
        job = dp.write_job(os.path.join(root, "job.yaml"), model, os.path.join(root, "run"),
                           [{"name": "a", "path": data}],
                           'finetune: { mode: prompt_tuning, prompt: { virtual_tokens: %d, init_text: "%s" } }\n'
                           % (V, TEXT))
        rd = os.path.join(root, "run")
        dp.train(job, 1, [f"run_dir={rd}", "train.steps=1", "train.lr=1e-12", "train.warmup_steps=0"])
        got = dp.read_safetensors(os.path.join(rd, "final", "adapter_model.safetensors"))["prompt_embeddings"]
        wte = dp.read_safetensors(os.path.join(model, "model.safetensors"))["model.embed_tokens.weight"]
        want = wte[np.array((ids * V)[:V])]
        err = float(np.max(np.abs(got.astype(np.float64) - want)))
        assert got.shape == (V, wte.shape[1]) and err <= 1e-9, f"TEXT init: max diff {err}"
        ac = json.load(open(os.path.join(rd, "final", "adapter_config.json")))
        assert ac["prompt_tuning_init"] == "TEXT" and ac["prompt_tuning_init_text"] == TEXT, ac
        assert ac["tokenizer_name_or_path"] == os.path.realpath(model), ac["tokenizer_name_or_path"]
        print(f"  TEXT init: ids {ids} repeated to {V} rows, max diff {err:.1e}")
        # sharding.stage 3 streams the load (each rank reads its parts of the embeddings; the rows are
        # assembled from the ranks' parts after it): the same init on 2 and 3 ranks, and the same training
        for ranks in (2, 3):
            rd = os.path.join(root, f"z3_init_{ranks}")
            dp.train(job, ranks, [f"run_dir={rd}", "train.steps=1", "train.lr=1e-12", "train.warmup_steps=0",
                                  "sharding.stage=3"])
            got = dp.read_safetensors(os.path.join(rd, "final", "adapter_model.safetensors"))["prompt_embeddings"]
            err = float(np.max(np.abs(got.astype(np.float64) - want)))
            assert err <= 1e-9, f"TEXT init at stage 3 on {ranks} ranks: max diff {err}"
        common = ["train.steps=4", "train.lr=3e-3", "train.micro_batch=12", "train.grad_accum=1"]
        dp.train(job, 1, common + [f"run_dir={root}/z0", "sharding.stage=0"], mpirun=False)
        ref = [x["loss"] for x in dp.losses(os.path.join(root, "z0"))]
        for ranks, micro in ((2, 6), (3, 4)):
            rd = os.path.join(root, f"z3_{ranks}")
            dp.train(job, ranks, common + [f"run_dir={rd}", "sharding.stage=3", f"train.micro_batch={micro}"])
            got = [x["loss"] for x in dp.losses(rd)]
            worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
            assert len(got) == len(ref) == 4 and worst <= 1e-6, f"stage 3 on {ranks} ranks: {got} vs {ref}"
        print(f"  stage 3 (streamed load) on 2 and 3 ranks: TEXT init equal within 1e-9; 4 steps' losses "
              f"= the 1-rank ZeRO-0 run within 1e-6 ({ref[0]:.6f} .. {ref[-1]:.6f})")
        r = dp.sh([dp.BIN, "train", job, f"model.path={bare}", f"run_dir={root}/refused"], check=False)
        lines = [x for x in r.stderr.strip().splitlines() if x]
        assert r.returncode != 0 and len(lines) == 1 and "tokenizer.json" in lines[0], r.stderr
        print(f"  refuses init_text without a tokenizer: {lines[0]}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("prompt TEXT init checks passed")


if __name__ == "__main__":
    main()
