"""test_train_samples.py — eval.generate: sample answers during a REAL 2-rank `shardtune train` run.

  1. samples.jsonl holds one line per prompt at steps 2, 4 and 6 (every_steps 2; 6 is also the end), in
     input order, with step, id, prompt (as given), output (null: the model has no tokenizer),
     output_ids and finish_reason;
  2. each step's samples equal `shardtune generate` (1 rank, and 2 ranks) run on the checkpoint of the
     same step exported as a model directory (token for token, finish reason included), and the last
     step's differ from the base model's answers (the samples come from the trained weights);
  3. an independent monitor client (pyzmq + test_telemetry_client's decoder) receives one Event of kind
     "sample" per line, with its step and the text "ID: IDS", and `shardtune monitor --json` shows them;
  4. config: an unknown key under eval.generate, a missing prompts file and text prompts for a model
     without a tokenizer are refused with one line naming the key / the cause, before any step runs;
  5. resume: a run stopped at step 4 (train.steps 4) and resumed to 6 leaves the same samples.jsonl;
  6. finetune.mode lora: the samples equal `generate --model BASE --adapter` of the adapter exported from
     each step's checkpoint (1 and 2 ranks), and differ from the base model's answers.
  7. text prompts with a tokenizer (a byte-level BPE and a chat template written here): the prompt string
     or messages and the answer text, equal to generate's, in samples.jsonl and the events.
  8. sharding.stage 3 on 2 ranks (each rank holds half the weights; generation gathers a layer at a time,
     the ranks in lockstep although rank 0 decodes two batches and rank 1 one): the
     samples equal generate (1 and 2 ranks) on each step's checkpoint; the same under lora with DoRA at
     stage 3 (adapters sharded too) against generate --adapter on the exported adapter; memory: sampling
     at stage 3 adds less than half of the half model a rank does not hold to its peak RSS (measured).
  9. finetune.mode qlora: the samples equal generate --adapter on each step's exported adapter over the
     base dequantized in numpy (test_qlora_torch.quant_dequant: nf4, double quantization, block 64), the
     base the training forward reads; under precision bf16 (embedding, head and the dequantized layer held in
     bf16 only) over that base with those rounded to bf16.
 10. prompt learning: prompt_tuning at sharding.stage 3 (the prompt sharded), p_tuning (MLP encoder: the
     samples use the encoder's output, the table peft saves) and prefix_tuning: the samples equal generate
     --adapter on the adapter exported from each step's checkpoint (peft_generate_prompt.py checks that
     generate against the real peft).
Env (set by ctest): SHARDTUNE_BIN, ST_SOURCE_DIR."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_monitor_train import ENV, ST, Sub, make_job  # noqa: E402
from test_telemetry_client import free_port  # noqa: E402

MAX_NEW, STEPS, EVERY = 8, 6, 2
OVER = ["train.lr=0.03", "train.schedule=constant"]  # trained weights differ visibly; resumable schedule


def sh(args, check=True):
    r = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError("%s -> %d\n%s\n%s" % (" ".join(args), r.returncode, r.stdout, r.stderr))
    return r


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_prompts(path, more=()):
    prompts = [{"id": "a", "input_ids": [5, 6, 7, 8]}, {"input_ids": [100, 3, 50]},
               {"id": "c", "input_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}] + list(more)
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps(p) + "\n")
    return prompts


def sample_extra(prompts):
    return ("eval: { every_steps: 0, generate: { every_steps: %d, prompts: %s, max_new: %d, batch: 2 } }\n"
            "checkpoint: { every_steps: %d, keep_last: 0 }\n" % (EVERY, prompts, MAX_NEW, EVERY))


def job_with(tmp, name, extra, steps=STEPS):
    """make_job's job (model, data and monitor of test_monitor_train) with `extra` appended, as NAME.yaml."""
    pub, ctl = "tcp://127.0.0.1:%d" % free_port(), "tcp://127.0.0.1:%d" % free_port()
    job = make_job(tmp, pub, ctl, steps, extra=extra)
    dst = os.path.join(tmp, name + ".yaml")
    shutil.move(job, dst)
    return dst, pub


def check_against_generate(tmp, ppath, prompts, samples, run_dir, lora=False, base_model=None):
    """Each step's samples against `generate` on that step's checkpoint: exported as a model directory, or
    under lora as a PEFT adapter that generate --adapter merges into the base model (base_model: another
    base directory, e.g. the dequantized one of a qlora run)."""
    base_model = base_model or os.path.join(tmp, "model")
    by_step = {}
    for s in samples:
        by_step.setdefault(s["step"], []).append(s)
    assert sorted(by_step) == list(range(EVERY, STEPS + 1, EVERY)), sorted(by_step)
    want_ids = [p.get("id", str(i)) for i, p in enumerate(prompts)]
    for step, rows in sorted(by_step.items()):
        assert [r["id"] for r in rows] == want_ids, rows
        for r, p in zip(rows, prompts):
            assert r["prompt"] == p["input_ids"] and r["output"] is None, r
            assert set(r) == {"step", "id", "prompt", "output", "output_ids", "finish_reason"}, r
        ck = os.path.join(run_dir, "checkpoints", "step-%08d.h5" % step)
        d = os.path.join(tmp, "export%d" % step)
        if lora:
            sh([ST, "export", ck, "--format", "peft", "--out", d])
            model = ["--model", base_model, "--adapter", d]
        else:
            sh([ST, "export", ck, "--out", d])
            model = ["--model", d]
        for np_ in (1, 2):
            out = os.path.join(tmp, "gen%d_%d.jsonl" % (step, np_))
            cmd = [ST, "generate", *model, "--prompts", ppath, "--out", out, "--max-new", str(MAX_NEW),
                   "--batch", "2", "--backend", "cpu"]
            if np_ == 2:
                cmd = ["mpirun", "--oversubscribe", "-np", "2"] + cmd
            sh(cmd)
            gen = read_jsonl(out)
            got = [(r["output_ids"], r["finish_reason"]) for r in rows]
            ref = [(g["output_ids"], g["finish_reason"]) for g in gen]
            assert got == ref, "step %d: samples %s != generate on the checkpoint (%d rank(s)) %s" % (step, got, np_, ref)
    base = os.path.join(tmp, "base.jsonl")
    sh([ST, "generate", "--model", os.path.join(tmp, "model"), "--prompts", ppath, "--out", base, "--max-new",
        str(MAX_NEW), "--batch", "2", "--backend", "cpu"])
    last = [r["output_ids"] for r in by_step[STEPS]]
    assert last != [g["output_ids"] for g in read_jsonl(base)], "samples at the end equal the base model's answers"
    return by_step


def test_samples(tmp):
    ppath = os.path.join(tmp, "prompts.jsonl")
    prompts = write_prompts(ppath)
    job, pub = job_with(tmp, "samples", sample_extra(ppath))
    sub = Sub(pub)
    mon_out = open(os.path.join(tmp, "monitor.out"), "w+")
    mon = subprocess.Popen([ST, "monitor", pub, "--json"], stdout=mon_out, stderr=subprocess.STDOUT, env=ENV)
    p = subprocess.Popen(["mpirun", "--oversubscribe", "-np", "2", ST, "train", job] + OVER, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sub.poll(120, until=lambda: any(e["kind"] == "end" for e in sub.events))
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out
    time.sleep(0.5)
    mon.send_signal(signal.SIGTERM)
    mon.wait(timeout=10)
    mon_out.seek(0)
    shown = [json.loads(l) for l in mon_out if l.startswith("{")]
    shown = [(m["step"], m["text"]) for m in shown if m.get("topic") == "event" and m.get("kind") == "sample"]
    run_dir = os.path.join(tmp, "run")
    samples = read_jsonl(os.path.join(run_dir, "samples.jsonl"))
    check_against_generate(tmp, ppath, prompts, samples, run_dir)
    events = [e for e in sub.events if e["kind"] == "sample"]
    want = [(s["step"], "%s: %s" % (s["id"], " ".join(str(i) for i in s["output_ids"]))) for s in samples]
    assert [(e["step"], e["text"]) for e in events] == want, (events, want)
    assert shown == want, ("shardtune monitor --json", shown, want)
    print("ok: %d samples at steps %s equal generate on each step's checkpoint (1 and 2 ranks); %d monitor events, "
          "all shown by shardtune monitor" % (len(samples), sorted({s["step"] for s in samples}), len(events)))
    return samples


def test_lora(tmp):
    """finetune.mode lora: the samples come from the base with the current adapter merged (as generate
    --adapter merges the adapter exported from the same step's checkpoint)."""
    ppath = os.path.join(tmp, "prompts.jsonl")
    prompts = write_prompts(ppath)
    job, _ = job_with(tmp, "lora", sample_extra(ppath) + "finetune: { mode: lora, lora: { r: 4, alpha: 8 } }\n")
    sh(["mpirun", "--oversubscribe", "-np", "2", ST, "train", job, "train.lr=0.05"] + OVER[1:])
    run_dir = os.path.join(tmp, "run")
    samples = read_jsonl(os.path.join(run_dir, "samples.jsonl"))
    check_against_generate(tmp, ppath, prompts, samples, run_dir, lora=True)
    print("ok: lora: %d samples equal generate --adapter on each step's exported adapter (1 and 2 ranks)"
          % len(samples))


def test_zero3(tmp):
    """sharding.stage 3: every rank holds its half of the weights; generation gathers them a layer at a time
    in lockstep: 5 prompts in batches of 2 give rank 0 batches 0 and 2 and rank 1 batch 1, so rank 0 runs
    twice the forwards (without the lockstep the gathers would not match and the run would hang)."""
    ppath = os.path.join(tmp, "prompts.jsonl")
    prompts = write_prompts(ppath, [{"id": "d", "input_ids": [9, 9, 30]}, {"id": "e", "input_ids": [77, 1]}])
    job, _ = job_with(tmp, "zero3", sample_extra(ppath) + "sharding: { stage: 3 }\n")
    sh(["mpirun", "--oversubscribe", "-np", "2", ST, "train", job] + OVER)
    run_dir = os.path.join(tmp, "run")
    samples = read_jsonl(os.path.join(run_dir, "samples.jsonl"))
    check_against_generate(tmp, ppath, prompts, samples, run_dir)
    print("ok: sharding.stage 3: %d samples equal generate on each step's checkpoint (1 and 2 ranks)" % len(samples))


def peak_rss(cmd, out):
    """The larger rank's peak RSS (bytes) of a 2-rank command, each rank under /usr/bin/time (into out)."""
    sh(["mpirun", "--oversubscribe", "-np", "2", "/usr/bin/time", "-f", "rss %M", "-a", "-o", out] + cmd)
    return 1024 * max(int(l.split()[1]) for l in open(out) if l.startswith("rss "))


def test_zero3_memory(tmp):
    """Bounded memory: at stage 3 a rank samples with its shard plus one gathered layer, never the whole
    model. A Llama of 8 layers x 512 (~90 MiB fp32), 2 ranks: the peak RSS of a run
    with eval.generate (every 2 steps, 5 prompts, 16 new tokens) exceeds that of the same run without it
    by less than half of the half model a rank does not hold (gathering the whole model would add all of
    it; observed +1.7 to +7.6 MiB on the 23 MiB 8 x 256 model, whose half is 11.5, hence the larger model)."""
    if not os.path.exists("/usr/bin/time"):
        print("skip: no /usr/bin/time")
        return
    ppath = os.path.join(tmp, "prompts.jsonl")
    write_prompts(ppath, [{"id": "d", "input_ids": [9, 9, 30]}, {"id": "e", "input_ids": [77, 1]}])
    job, _ = job_with(tmp, "mem", sample_extra(ppath).replace("max_new: %d" % MAX_NEW, "max_new: 16") +
                      "sharding: { stage: 3 }\n")
    model = os.path.join(tmp, "model")  # the job's data, a larger model
    shutil.rmtree(model)
    # 8 x 512 (~90 MiB): the peak RSS of two runs differs by up to ~8 MiB whatever they do (allocator and MPI
    # threads), so the model is large enough that a whole-model gather (+half of it) stands far above that
    sh([ST, "init-model", "--family", "llama", "--layers", "8", "--dim", "512", "--heads", "8", "--kv-heads", "4",
        "--vocab", "256", "--max-seq", "64", "--out", model])
    base = [ST, "train", job, "train.steps=4", "checkpoint.every_steps=0"]
    with_gen = peak_rss(base + ["run_dir=%s/run_gen" % tmp], os.path.join(tmp, "rss_gen"))
    # sampling off: every eval.generate key back to its default (one set without sampling is refused)
    off = ["eval.generate.every_steps=0", "eval.generate.prompts=", "eval.generate.max_new=64", "eval.generate.batch=8"]
    without = peak_rss(base + ["run_dir=%s/run_plain" % tmp] + off, os.path.join(tmp, "rss_plain"))
    whole = os.path.getsize(os.path.join(model, "model.safetensors"))
    assert len(read_jsonl(os.path.join(tmp, "run_gen", "samples.jsonl"))) == 10
    d = with_gen - without
    print("ok: stage-3 sampling adds %.1f MiB to a rank's peak RSS (%.1f -> %.1f MiB); the model is %.1f MiB, half "
          "of it %.1f MiB" % (d / 2**20, without / 2**20, with_gen / 2**20, whole / 2**20, whole / 2**21))
    assert d < 0.5 * whole / 2, "sampling at stage 3 holds more than a layer's weights: +%d bytes" % d


def test_dora_zero3(tmp):
    """lora with DoRA at sharding.stage 3 (the adapters sharded): the samples equal generate --adapter."""
    ppath = os.path.join(tmp, "prompts.jsonl")
    prompts = write_prompts(ppath)
    extra = sample_extra(ppath) + "finetune: { mode: lora, lora: { r: 4, alpha: 8, dora: true } }\nsharding: { stage: 3 }\n"
    job, _ = job_with(tmp, "dora", extra)
    sh(["mpirun", "--oversubscribe", "-np", "2", ST, "train", job, "train.lr=0.05"] + OVER[1:])
    run_dir = os.path.join(tmp, "run")
    samples = read_jsonl(os.path.join(run_dir, "samples.jsonl"))
    check_against_generate(tmp, ppath, prompts, samples, run_dir, lora=True)
    print("ok: DoRA at stage 3: %d samples equal generate --adapter on each step's exported adapter" % len(samples))


def test_qlora(tmp, bf16=False):
    """finetune.mode qlora: the samples come from the quantized base the training forward reads (dequantized
    a layer at a time) with the adapter folded in: generate --adapter over the numpy-dequantized base.
    bf16: the embedding, the LM head and each dequantized layer exist in bf16 only (worker/qlora.h); the
    samples widen them, so the reference base is the dequantized one with those rounded to bf16."""
    from test_qlora_torch import quant_dequant  # numpy nf4 / int8 (double) quantization round trip
    from test_qlora_train import bf16_rounded
    import numpy as np
    import st_io
    ppath = os.path.join(tmp, "prompts.jsonl")
    prompts = write_prompts(ppath)
    extra = sample_extra(ppath) + "finetune: { mode: qlora, lora: { r: 4, alpha: 8 }, qlora: { quant: nf4, block: 64 } }\n"
    if bf16:
        extra += "precision: bf16\n"
    job, _ = job_with(tmp, "qlora", extra)
    sh(["mpirun", "--oversubscribe", "-np", "2", ST, "train", job, "train.lr=0.05"] + OVER[1:])
    model, deq = os.path.join(tmp, "model"), os.path.join(tmp, "deq")
    shutil.copytree(model, deq)
    w = st_io.read(os.path.join(model, "model.safetensors"))
    for k in w:
        if w[k].ndim == 2 and k.startswith("model.layers."):
            w[k] = quant_dequant(np.asarray(w[k], np.float32), "nf4", True, 64)
            if bf16:
                w[k] = bf16_rounded(w[k])
        elif bf16 and k in ("model.embed_tokens.weight", "lm_head.weight"):
            w[k] = bf16_rounded(w[k])
    st_io.write(os.path.join(deq, "model.safetensors"), {k: np.asarray(v, np.float32) for k, v in w.items()})
    run_dir = os.path.join(tmp, "run")
    samples = read_jsonl(os.path.join(run_dir, "samples.jsonl"))
    check_against_generate(tmp, ppath, prompts, samples, run_dir, lora=True, base_model=deq)
    # the quantization shows: over the fp32 base the same adapter answers otherwise
    d, out = os.path.join(tmp, "export%d" % STEPS), os.path.join(tmp, "fp32base.jsonl")
    sh([ST, "generate", "--model", model, "--adapter", d, "--prompts", ppath, "--out", out, "--max-new", str(MAX_NEW),
        "--batch", "2", "--backend", "cpu"])
    last = [r["output_ids"] for r in samples if r["step"] == STEPS]
    # (bf16: the few greedy tokens of this tiny model can coincide; the fp32 case shows the quantization)
    assert bf16 or last != [g["output_ids"] for g in read_jsonl(out)], "qlora samples equal the fp32 base's: no quantization seen"
    print("ok: qlora%s: %d samples equal generate --adapter over the numpy-dequantized base%s" %
          (" bf16" if bf16 else "", len(samples), " rounded to bf16" if bf16 else " (and differ over the fp32 base)"))


def test_qlora_bf16(tmp):
    test_qlora(tmp, bf16=True)


def test_prompt_modes(tmp):
    """prompt_tuning at stage 3, p_tuning and prefix_tuning: the samples equal generate --adapter on the
    adapter exported from each step's checkpoint."""
    ppath = os.path.join(tmp, "prompts.jsonl")
    prompts = write_prompts(ppath)
    cases = [("prompt_tuning", "{ mode: prompt_tuning, prompt: { virtual_tokens: 4 } }", "sharding: { stage: 3 }\n"),
             ("p_tuning", "{ mode: p_tuning, prompt: { virtual_tokens: 3, encoder: mlp } }", ""),
             ("prefix_tuning", "{ mode: prefix_tuning, prefix: { virtual_tokens: 5 } }", "")]
    for name, ft, more in cases:
        sub = os.path.join(tmp, name)
        os.makedirs(sub)
        job, _ = job_with(sub, name, sample_extra(ppath) + "finetune: " + ft + "\n" + more)
        sh(["mpirun", "--oversubscribe", "-np", "2", ST, "train", job, "train.lr=0.05"] + OVER[1:])
        run_dir = os.path.join(sub, "run")
        samples = read_jsonl(os.path.join(run_dir, "samples.jsonl"))
        check_against_generate(sub, ppath, prompts, samples, run_dir, lora=True)
        print("ok: %s%s: %d samples equal generate --adapter on each step's exported adapter (1 and 2 ranks)"
              % (name, " at stage 3" if more else "", len(samples)))


def byte_level_tokenizer(model_dir):
    """A GPT-2 style byte-level BPE tokenizer.json without merges: byte b is token b (vocab 256)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): b for b, c in zip(bs, cs)}
    level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": dict(type="ByteLevel", **level), "post_processor": None,
           "decoder": dict(type="ByteLevel", **level),
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                     "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                     "merges": []}}
    with open(os.path.join(model_dir, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": template}, f)


def test_text(tmp):
    """Text prompts (the model has a tokenizer): samples hold the prompt string and the answer text, equal to
    generate's on the exported checkpoint; the monitor event's text is "ID: ANSWER"."""
    ppath = os.path.join(tmp, "prompts.jsonl")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    with open(ppath, "w") as f:
        f.write(json.dumps({"id": "q", "prompt": "Say \"hi\"\n\tnow"}) + "\n" + json.dumps({"input_ids": [7, 8]}) + "\n")
        f.write(json.dumps({"id": "m", "messages": msgs}) + "\n")
    job, pub = job_with(tmp, "text", sample_extra(ppath))
    byte_level_tokenizer(os.path.join(tmp, "model"))
    sub = Sub(pub)
    p = subprocess.Popen([ST, "train", job, "train.steps=2"] + OVER, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    sub.poll(120, until=lambda: any(e["kind"] == "end" for e in sub.events))
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out
    rows = read_jsonl(os.path.join(tmp, "run", "samples.jsonl"))
    d = os.path.join(tmp, "export_text")
    sh([ST, "export", os.path.join(tmp, "run", "checkpoints", "step-%08d.h5" % 2), "--out", d])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not os.path.exists(os.path.join(d, name)):
            shutil.copy(os.path.join(tmp, "model", name), d)
    gen = os.path.join(tmp, "gen_text.jsonl")
    sh([ST, "generate", "--model", d, "--prompts", ppath, "--out", gen, "--max-new", str(MAX_NEW), "--batch", "2"])
    gen = read_jsonl(gen)
    assert [r["prompt"] for r in rows] == ["Say \"hi\"\n\tnow", [7, 8], msgs], rows
    assert [(r["output"], r["output_ids"]) for r in rows] == [(g["output"], g["output_ids"]) for g in gen], (rows, gen)
    events = [(e["step"], e["text"]) for e in sub.events if e["kind"] == "sample"]
    assert events == [(2, "q: " + rows[0]["output"]), (2, "1: " + rows[1]["output"]), (2, "m: " + rows[2]["output"])], \
        events
    print("ok: text prompts: prompt and answer text in samples.jsonl = generate on the checkpoint; events %s" % events)


def test_resume(tmp, full):
    """The same job stopped at step 4, resumed to 6: the same samples.jsonl as the uninterrupted run."""
    ppath = os.path.join(tmp, "prompts.jsonl")
    write_prompts(ppath)
    job, _ = job_with(tmp, "resume", sample_extra(ppath))
    sh(["mpirun", "--oversubscribe", "-np", "2", ST, "train", job, "train.steps=4"] + OVER)
    # a stale line after the resume point (as a crash between sampling and checkpointing leaves) goes away
    with open(os.path.join(tmp, "run", "samples.jsonl"), "a") as f:
        f.write(json.dumps({"step": 5, "id": "stale", "prompt": [], "output": None, "output_ids": [],
                            "finish_reason": "length"}) + "\n")
    sh(["mpirun", "--oversubscribe", "-np", "2", ST, "train", job] + OVER)
    got = read_jsonl(os.path.join(tmp, "run", "samples.jsonl"))
    # the run stopped at 4 sampled there as its end: same weights as the uninterrupted run's step 4
    assert got == full, "resumed samples differ:\n%s\n%s" % (got, full)
    print("ok: stopped at step 4 and resumed: samples.jsonl equals the uninterrupted run's")


def test_refusals(tmp):
    ppath = os.path.join(tmp, "prompts.jsonl")
    write_prompts(ppath)
    text = os.path.join(tmp, "text.jsonl")
    with open(text, "w") as f:
        f.write(json.dumps({"prompt": "hi"}) + "\n")
    cases = [(sample_extra(ppath), ["eval.generate.max_neww=3"], "eval.generate.max_neww"),
             (sample_extra(text), [], "no tokenizer.json"),
             (sample_extra(os.path.join(tmp, "missing.jsonl")), [], "missing.jsonl"),
             ("eval: { generate: { every_steps: 2 } }\n", [], "eval.generate.prompts")]
    for extra, over, needle in cases:
        job, _ = job_with(tmp, "bad", extra)
        r = sh([ST, "train", job] + over, check=False)
        lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
        assert r.returncode != 0 and lines and needle in lines[-1], (needle, r.returncode, r.stdout, r.stderr)
        assert not os.path.exists(os.path.join(tmp, "run", "samples.jsonl")), needle
        print("ok: refused: %s" % lines[-1])


def main():
    only = sys.argv[1:]  # names of the test_ functions to run (all when none)
    if only:
        for name in only:
            with tempfile.TemporaryDirectory() as tmp:
                globals()["test_" + name](tmp)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        full = test_samples(tmp)
        with tempfile.TemporaryDirectory() as tmp2:
            shutil.copytree(os.path.join(tmp, "model"), os.path.join(tmp2, "model"))
            shutil.copy(os.path.join(tmp, "d.h5"), os.path.join(tmp2, "d.h5"))
            test_resume(tmp2, full)
    with tempfile.TemporaryDirectory() as tmp:
        test_lora(tmp)
    with tempfile.TemporaryDirectory() as tmp:
        test_zero3(tmp)
    with tempfile.TemporaryDirectory() as tmp:
        test_zero3_memory(tmp)
    with tempfile.TemporaryDirectory() as tmp:
        test_dora_zero3(tmp)
    with tempfile.TemporaryDirectory() as tmp:
        test_qlora(tmp)
    with tempfile.TemporaryDirectory() as tmp:
        test_qlora_bf16(tmp)
    with tempfile.TemporaryDirectory() as tmp:
        test_prompt_modes(tmp)
    with tempfile.TemporaryDirectory() as tmp:
        test_text(tmp)
    with tempfile.TemporaryDirectory() as tmp:
        test_refusals(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
