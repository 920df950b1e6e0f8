"""Prompt tuning's TEXT init (finetune.prompt.init_text), against PyPI's tokenizers (scripts/pyref).

peft's PromptEmbedding with prompt_tuning_init TEXT takes tokenizer(init_text)["input_ids"] (special tokens
added), repeats the ids and cuts them to num_virtual_tokens, and copies those rows of the word embeddings.
Here: a BPE tokenizer.json built with `tokenizers` (a merge, so ids are not just characters, and a BOS from its post-processor) is put in a
Llama model's directory; a 1-step run at lr 1e-12 (AdamW moves each element by ~lr) leaves final/'s
prompt_embeddings equal to embed_tokens[ids repeated to V] within 1e-9, the ids being what `tokenizers`
encodes; adapter_config.json says prompt_tuning_init TEXT with the text and tokenizer_name_or_path (peft's
PromptTuningConfig requires it for TEXT). A model directory without tokenizer.json is refused with one line.
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
        r = dp.sh([dp.BIN, "train", job, f"model.path={bare}", f"run_dir={root}/refused"], check=False)
        lines = [x for x in r.stderr.strip().splitlines() if x]
        assert r.returncode != 0 and len(lines) == 1 and "tokenizer.json" in lines[0], r.stderr
        print(f"  refuses init_text without a tokenizer: {lines[0]}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("prompt TEXT init checks passed")


if __name__ == "__main__":
    main()
