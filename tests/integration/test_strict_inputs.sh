#!/usr/bin/env bash
# test_strict_inputs.sh — every bad input a user can give ends with one line naming it (issue 15, item 4).
# CLI numbers (init-model, eval, monitor, ctl), config ranges (threads, int64 steps, micro_batch overflow,
# train_layers in full mode), NaN/Inf weights at load (train, eval, generate, compress, export), an all-masked
# dataset, one monitor socket off, an unknown SHARDTUNE_SGEMM library; bad command lines name the flag (exit 2); failed export/compress leave no
# OUT behind; a prompt-tuning checkpoint has no GGUF form.
source "$(dirname "$0")/ckpt_lib.sh"

# bad CMD... -- PATTERN: exits non-zero within 10 s, stderr matches PATTERN, nothing but one error line
bad() {
  local pat=${*: -1}; local cmd=("${@:1:$#-1}")
  set +e; local err; err=$(timeout 10 "${cmd[@]}" 2>&1 >/dev/null); local rc=$?; set -e
  [ $rc -ne 0 ] && [ $rc -ne 124 ] || fail "${cmd[*]}: exit $rc (expected a clean failure)"
  echo "$err" | grep -q -- "$pat" || fail "${cmd[*]}: message '$err' lacks '$pat'"
  [ "$(echo "$err" | wc -l)" = 1 ] || fail "${cmd[*]}: more than one line: $err"
  echo "ok: ${cmd[1]} ${cmd[2]} ${cmd[3]}: $err"
}
IM=(init-model --family llama --dim 64 --heads 4 --vocab 128 --out $T/x)
bad "$BIN" "${IM[@]}" --layers foo "init-model: error: --layers: expected an integer in 1..4096, got 'foo'"
bad "$BIN" "${IM[@]}" --layers 2 --seed abc "--seed: expected an integer in 0..9223372036854775807, got 'abc'"
bad "$BIN" "${IM[@]}" --layers 2 --heads 4x "--heads: expected an integer in 1..1024, got '4x'"
bad "$BIN" "${IM[@]}" --layers 2 --rope-theta nan "--rope-theta: expected a number"
bad "$BIN" init-model --family gpt2 --layers 2 --dim 64 --heads 4 --kv-heads 2 --vocab 128 --out $T/g "--kv-heads: GPT-2 has no grouped-query attention"
[ ! -e $T/g ] || fail "a refused init-model left $T/g"
bad "$BIN" eval --model $T/model --data $T/train.h5 --seq-len 16x "eval: error: --seq-len: expected an integer"
bad "$BIN" monitor tcp://127.0.0.1:1 --timeout nan "monitor: error: --timeout: expected a number in \[0, 1e+09\], got 'nan'"
bad "$BIN" ctl tcp://127.0.0.1:1 status --timeout -1 "ctl: error: --timeout: expected a number"
SHARDTUNE_SGEMM=mkl bad "$BIN" eval --model $T/model --data $T/train.h5 --seq-len 16 "shardtune: error: SHARDTUNE_SGEMM=mkl: expected onednn or openblas"

job j 2 2 1
bad "$BIN" train $T/j.yaml threads=100000 "threads: expected an integer in 0..1024, got '100000'"
bad "$BIN" train $T/j.yaml train.steps=4294967299 "train.steps: expected an integer in 1..2147483647, got '4294967299'"
bad "$BIN" train $T/j.yaml train.micro_batch=2147483647 "train.micro_batch x train.seq_len = "
bad "$BIN" train $T/j.yaml finetune.train_layers=0-1 "finetune.train_layers: '0-1' has no effect in finetune.mode full"

# eval under mpirun: rank 0 evaluates and prints once, exactly what one rank prints (it ran on every rank)
for args in "--data $T/train.h5 --seq-len 16 --json" "--split val --job $T/j.yaml"; do
  one=$("$BIN" eval --model $T/model $args) || fail "eval $args"
  two=$(mpirun --oversubscribe -np 2 "$BIN" eval --model $T/model $args) || fail "mpirun eval $args"
  [ -n "$one" ] && [ "$one" = "$two" ] || fail "eval $args on 2 ranks printed '$two', on 1 rank '$one'"
done
# rank 1 of 2 (as mpirun tells it) leaves the job, its errors included, to rank 0 (a failing mpirun costs seconds)
out=$(OMPI_COMM_WORLD_RANK=1 OMPI_COMM_WORLD_SIZE=2 "$BIN" eval --model $T/model --data $T/none.h5 --seq-len 16 2>&1) \
  && [ -z "$out" ] || fail "eval as rank 1 of 2: $out"
echo "ok: eval on 2 ranks prints once what 1 rank prints"

# a train that fails before its first step leaves no run directory it created (nor its parents); one that
# existed keeps what it held
bad "$BIN" train $T/j.yaml run_dir=$T/nr/a/b resume=$T/none.h5 "checkpoint $T/none.h5"
bad "$BIN" train $T/j.yaml run_dir=$T/nr2/ monitor.publish=bogus://x "cannot bind PUB (monitor.publish) socket to bogus://x"
[ ! -e $T/nr ] && [ ! -e $T/nr2 ] || fail "a train that failed at the start left $(ls -d $T/nr* | head -1) behind"
mkdir -p $T/nr3 && echo mine > $T/nr3/note.txt
bad "$BIN" train $T/j.yaml run_dir=$T/nr3 resume=$T/none.h5 "checkpoint $T/none.h5"
[ "$(cat $T/nr3/note.txt)" = mine ] || fail "a failed train touched an existing run directory's files"

# NaN / Inf weights: refused at load naming the tensor (train and eval)
cp -r $T/model $T/nanmodel
"$PY" - $T/nanmodel/model.safetensors <<'PYEOF'
import json, struct, sys
p = sys.argv[1]; b = bytearray(open(p, "rb").read())
n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
name = "model.layers.1.mlp.up_proj.weight"; s = h[name]["data_offsets"][0] + 8 + n
b[s + 4 * 5:s + 4 * 6] = struct.pack("<f", float("inf"))
open(p, "wb").write(b)
PYEOF
bad "$BIN" eval --model $T/nanmodel --data $T/train.h5 --seq-len 16 "tensor model.layers.1.mlp.up_proj.weight holds a non-finite value (inf at element 5)"
bad "$BIN" train $T/j.yaml model.path=$T/nanmodel "tensor model.layers.1.mlp.up_proj.weight holds a non-finite value"
echo '{"input_ids": [1, 2, 3]}' > $T/p.jsonl
bad "$BIN" generate --model $T/nanmodel --prompts $T/p.jsonl --out $T/nan.jsonl "tensor model.layers.1.mlp.up_proj.weight holds a non-finite value"
bad "$BIN" compress --model $T/nanmodel --out $T/nanc --drop-layers 1 "tensor model.layers.1.mlp.up_proj.weight holds a non-finite value"
bad "$BIN" export $T/nanmodel --out $T/nane "tensor model.layers.1.mlp.up_proj.weight holds a non-finite value"
bad "$BIN" export $T/nanmodel --out $T/nan.gguf --format gguf "tensor model.layers.1.mlp.up_proj.weight holds a non-finite value"
[ ! -e $T/nan.jsonl ] && [ ! -e $T/nanc ] && [ ! -e $T/nane ] && [ ! -e $T/nan.gguf ] || fail "a refused NaN model left output behind"

# an all-masked dataset
"$PY" - $T/masked.jsonl <<'PYEOF'
import json, sys
with open(sys.argv[1], "w") as f:
    for d in range(20):
        ids = [(d * 7 + i) % 100 + 1 for i in range(40)]
        f.write(json.dumps({"input_ids": ids, "labels": [-100] * 40}) + "\n")
PYEOF
"$BIN" data pack --jsonl $T/masked.jsonl --out $T/masked.h5 --vocab 128 >/dev/null
bad "$BIN" train $T/j.yaml tasks.0.path=$T/masked.h5 "every token of $T/masked.h5 is masked"
bad "$BIN" eval --model $T/model --data $T/masked.h5 --seq-len 16 "no unmasked target token"

# one monitor socket off: works (the other still serves)
[ "$(train 1 j 'monitor.publish=""' 'monitor.control=tcp://127.0.0.1:*')" = 0 ] || fail "publish off: $(tail -2 $T/j.err)"
[ "$(train 1 j 'monitor.control=""' 'monitor.publish=tcp://127.0.0.1:*' resume=none)" = 0 ] || fail "control off: $(tail -2 $T/j.err)"
echo "ok: one monitor socket off works"

# a bad command line: exit 2 and a first line naming the flag or what is missing (then the usage)
bad_usage() {
  local pat=${*: -1}; local cmd=("${@:1:$#-1}")
  set +e; local err; err=$(timeout 10 "${cmd[@]}" 2>&1 >/dev/null); local rc=$?; set -e
  [ $rc -eq 2 ] || fail "${cmd[*]}: exit $rc (expected 2): $err"
  local first=${err%%$'\n'*} # no pipe into grep -q: under pipefail an early exit would SIGPIPE the writer
  grep -q -- "$pat" <<< "$first" || fail "${cmd[*]}: first line of '$err' lacks '$pat'"
  echo "ok: ${cmd[1]} ${cmd[2]}: $first"
}
bad_usage "$BIN" "${IM[@]}" --layers 2 --bogus "init-model: error: unknown or incomplete argument '--bogus'"
bad_usage "$BIN" init-model --family llama --layers 2 --dim 64 --heads 4 --vocab 128 "init-model: error: missing --out DIR"
bad_usage "$BIN" eval --model $T/model --data $T/train.h5 --seq-len 16 --bogus "eval: error: unknown or incomplete argument '--bogus'"
bad_usage "$BIN" eval --model $T/model --data $T/train.h5 "eval: error: missing --seq-len T"
bad_usage "$BIN" generate --model $T/model --out $T/o.jsonl "generate: error: missing --prompts IN.jsonl"
bad_usage "$BIN" generate --model $T/model --prompts x --out $T/o.jsonl --top-p 2 "generate: error: --top-p '2'"
bad_usage "$BIN" plan $T/j.yaml "plan: error: missing --ranks N"
bad_usage "$BIN" plan $T/j.yaml --ranks 2 --bogus "plan: error: unknown or incomplete argument '--bogus'"
bad_usage "$BIN" ckpt check $T/x.h5 "ckpt: error: unknown subcommand 'check'"
bad_usage "$BIN" export $T/model --out $T/e --quant q8_0 "export: error: --quant goes with --format gguf"
bad_usage "$BIN" export $T/model --out $T/e --bogus "export: error: unknown or incomplete argument '--bogus'"
bad_usage "$BIN" export $T/model "export: error: missing --out DIR"
mkdir -p $T/adapter && echo '{"peft_type": "LORA"}' > $T/adapter/adapter_config.json
bad_usage "$BIN" export $T/adapter --out $T/e "export: error: $T/adapter is a PEFT adapter directory: pass --merge"
bad_usage "$BIN" compress --model $T/model --out $T/c --bogus "compress: error: unknown or incomplete argument '--bogus'"
bad_usage "$BIN" compare score $T --bogus "compare score: error: unknown or incomplete argument '--bogus'"
bad_usage "$BIN" compare rank "compare: error: unknown subcommand 'rank'"
# compare score: the last vote of a repeated id counts, and a note on stderr says how many were superseded
mkdir -p $T/cmp && echo '{"0": "A", "1": "B", "2": "A"}' > $T/cmp/key.json
printf '%s\n' '{"id": "0", "vote": "A"}' '{"id": "0", "vote": "B"}' '{"id": "1", "vote": "B"}' '{"id": "2", "vote": "tie"}' \
  '{"id": "2", "vote": "A"}' > $T/cmp/votes.jsonl
out=$("$BIN" compare score $T/cmp --votes $T/cmp/votes.jsonl --json 2>$T/cmp/err) || fail "compare score: $(cat $T/cmp/err)"
"$PY" -c "import json, sys; r = json.loads(sys.argv[1]); assert (r['wins'], r['losses'], r['ties']) == (2, 1, 0), r" "$out" \
  || fail "compare score counts (last vote per id: 0 B = loss, 1 B = win, 2 A = win): $out"
[ "$(cat $T/cmp/err)" = "shardtune compare score: note: 2 votes superseded by a later vote of the same id (the last vote of an id counts)" ] \
  || fail "compare score note: $(cat $T/cmp/err)"
head -3 $T/cmp/votes.jsonl | tail -1 > $T/cmp/one.jsonl
"$BIN" compare score $T/cmp --votes $T/cmp/one.jsonl 2>$T/cmp/err >/dev/null && [ ! -s $T/cmp/err ] || fail "a note without a repeated id: $(cat $T/cmp/err)"
echo "ok: compare score notes superseded votes"
bad_usage "$BIN" plot $T/j "plot: error: missing --out FILE.svg|FILE.png"
bad_usage "$BIN" monitor --bogus "monitor: error: unknown argument '--bogus'"
bad_usage "$BIN" ctl --run-dir $T/j "ctl: error: missing the command"
bad_usage "$BIN" ctl stop "ctl: error: missing ADDR: pass the job's monitor.control address, --run-dir DIR or --token-file F"
bad_usage "$BIN" monitor --json "monitor: error: missing ADDR: pass the job's monitor.publish address or --run-dir DIR"
bad_usage "$BIN" train --bogus "train: error: unknown or incomplete argument '--bogus'"
[ ! -e $T/e ] && [ ! -e $T/c ] || fail "a refused command line left output behind"

# an existing non-empty OUT is refused by name (a typo must not lose a model or a dataset); --force replaces
# it whole (written aside, then renamed: no stale file of the old one, no temporary left)
sum_before=$(cat $T/model/* $T/train.h5 | md5sum)
bad "$BIN" "${IM[@]:0:9}" --out $T/model --layers 2 "init-model: error: $T/model already exists and is not empty (pass --force to replace it)"
bad "$BIN" export $T/nanmodel --out $T/model "export: error: $T/model already exists and is not empty"
bad "$BIN" export $T/nanmodel --out $T/model --format gguf "export: error: $T/model already exists and is not empty"
bad "$BIN" export $T/adapter --merge --out $T/model "export: error: $T/model already exists and is not empty"
bad "$BIN" data pack --jsonl $T/masked.jsonl --out $T/train.h5 --vocab 128 "data: error: $T/train.h5 already exists and is not empty"
[ "$(cat $T/model/* $T/train.h5 | md5sum)" = "$sum_before" ] || fail "a refused command changed an existing OUT"
mkdir -p $T/fm && : > $T/fm.h5 # an empty directory / file is fine
"$BIN" "${IM[@]:0:9}" --out $T/fm --layers 1 >/dev/null || fail "init-model into an empty directory"
"$BIN" data pack --jsonl $T/masked.jsonl --out $T/fm.h5 --vocab 128 >/dev/null || fail "data pack over an empty file"
echo stale > $T/fm/stale.txt
"$BIN" "${IM[@]:0:9}" --out $T/fm --layers 2 --force >/dev/null || fail "init-model --force"
[ ! -e $T/fm/stale.txt ] && grep -q '"num_hidden_layers": 2' $T/fm/config.json || fail "init-model --force did not replace $T/fm whole"
"$BIN" export $T/fm --out $T/fm2 >/dev/null && "$BIN" export $T/model --out $T/fm2 --force >/dev/null || fail "export --force"
"$BIN" export $T/model --out $T/fm3 >/dev/null && cmp -s $T/fm2/model.safetensors $T/fm3/model.safetensors || fail "export --force did not replace $T/fm2"
"$BIN" data pack --jsonl $T/masked.jsonl --out $T/fm.h5 --vocab 110 --force >/dev/null || fail "data pack --force"
"$PY" -c "import h5py, sys; assert h5py.File(sys.argv[1])['/'].attrs['vocab_size'] == 110" $T/fm.h5 || fail "data pack --force did not replace"
bad "$BIN" export $T/nanmodel --out $T/fm --force "holds a non-finite value"
grep -q '"num_hidden_layers": 2' $T/fm/config.json || fail "a failed export --force touched the existing OUT"
# the same for generate (on 2 ranks too: rank 0 decides for all), compress and plot
echo keep > $T/keep.jsonl && echo keep > $T/keep.svg && mkdir -p $T/keepdir && echo keep > $T/keepdir/f
mkdir -p $T/pl && printf '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.0}\n' > $T/pl/metrics.jsonl
bad "$BIN" generate --model $T/model --prompts $T/p.jsonl --out $T/keep.jsonl "generate: error: $T/keep.jsonl already exists and is not empty (pass --force to replace it)"
set +e; err=$(timeout 20 mpirun --oversubscribe -np 2 "$BIN" generate --model $T/model --prompts $T/p.jsonl --out $T/keep.jsonl 2>&1); rc=$?; set -e
[ $rc -ne 0 ] && [ $rc -ne 124 ] && [ "$(echo "$err" | grep -c "already exists")" = 1 ] || fail "generate on 2 ranks over an existing OUT: exit $rc: $err"
bad "$BIN" compress --model $T/model --out $T/keepdir --drop-layers 1 "compress: error: $T/keepdir already exists and is not empty (pass --force to replace it)"
bad "$BIN" plot $T/pl --out $T/keep.svg "plot: error: $T/keep.svg already exists and is not empty (pass --force to replace it)"
[ "$(cat $T/keep.jsonl $T/keep.svg $T/keepdir/f)" = "$(printf 'keep\nkeep\nkeep')" ] || fail "a refused generate/compress/plot changed an existing OUT"
"$BIN" generate --model $T/model --prompts $T/p.jsonl --out $T/keep.jsonl --max-new 2 --force 2>/dev/null && grep -q '"output_ids"' $T/keep.jsonl \
  || fail "generate --force did not replace $T/keep.jsonl"
"$BIN" compress --model $T/model --out $T/keepdir --drop-layers 1 --force >/dev/null && [ ! -e $T/keepdir/f ] && [ -s $T/keepdir/config.json ] \
  || fail "compress --force did not replace $T/keepdir whole"
"$BIN" plot $T/pl --out $T/keep.svg --force >/dev/null && grep -q "<svg" $T/keep.svg || fail "plot --force did not replace $T/keep.svg"
[ -z "$(ls -d $T/*.tmp-* 2>/dev/null)" ] || fail "temporaries left: $(ls -d $T/*.tmp-*)"
echo "ok: an existing OUT is refused, --force replaces it whole"

# a failed export leaves no OUT directory behind (a checkpoint whose /model tensor fails its checksum)
[ "$(train 1 j)" = 0 ] || fail "train for export: $(tail -2 $T/j.err)"
CK=$T/j/checkpoints/$(cat $T/j/checkpoints/latest)
cp "$CK" $T/flip.h5
"$PY" - $T/flip.h5 <<'PYEOF'
import h5py, sys
with h5py.File(sys.argv[1], "r") as f:
    off = f["model/model.layers.1.mlp.up_proj.weight"].id.get_offset()
b = bytearray(open(sys.argv[1], "rb").read()); b[off + 101] ^= 4; open(sys.argv[1], "wb").write(b)
PYEOF
bad "$BIN" export $T/flip.h5 --out $T/exp_bad "tensor model/model.layers.1.mlp.up_proj.weight fails its checksum"
[ ! -e $T/exp_bad ] || fail "a failed export left $T/exp_bad behind: $(ls -la $T/exp_bad)"
bad "$BIN" export $T/flip.h5 --merge --out $T/exp_bad "fails its checksum"
[ ! -e $T/exp_bad ] || fail "a failed export --merge left $T/exp_bad behind"
mkdir $T/exp_keep; echo mine > $T/exp_keep/note.txt
bad "$BIN" export $T/flip.h5 --out $T/exp_keep --force "fails its checksum"
[ "$(cat $T/exp_keep/note.txt)" = mine ] || fail "a failed export into an existing directory removed its files"
# a failure late in compress (after the weights were written) leaves no OUT either; a directory where a
# file belongs is named as such (it read as a 2^63-byte file: "out of memory")
cp -r $T/model $T/mdir && mkdir $T/mdir/tokenizer.json
bad "$BIN" compress --model $T/mdir --out $T/cz --drop-layers 1 "$T/mdir/tokenizer.json is not a regular file (a directory)"
[ ! -e $T/cz ] || fail "a failed compress left $T/cz behind: $(ls $T/cz)"
bad "$BIN" generate --model $T/model --prompts $T --out $T/o.jsonl "$T is not a regular file (a directory)"
echo "ok: a failed export leaves no output"

# a prompt-tuning checkpoint has no GGUF form: refused naming the mode (it said the embedding was missing)
[ "$(train 1 j run_dir=$T/pt finetune.mode=prompt_tuning finetune.prompt.virtual_tokens=4)" = 0 ] || fail "prompt_tuning train: $(tail -2 $T/j.err)"
bad "$BIN" export $T/pt/checkpoints --out $T/pt.gguf --format gguf "is from a finetune.mode prompt_tuning run: GGUF has no prompt-learning adapter"
[ ! -e $T/pt.gguf ] || fail "a refused GGUF export left $T/pt.gguf"
cp -r $T/pt/final $T/pta
"$PY" -c "import json, sys; p = sys.argv[1]; c = json.load(open(p)); c['modules_to_save'] = ['lm_head']; json.dump(c, open(p, 'w'))" $T/pta/adapter_config.json
bad "$BIN" eval --model $T/model --adapter $T/pta --data $T/train.h5 --seq-len 16 "adapter_config.json: modules_to_save is not supported"

# adapter_config.json keys that change what a PEFT LoRA adapter computes: refused by name, never applied as
# plain LoRA (peft's defaults, as in final/, load)
[ "$(train 1 j run_dir=$T/lo finetune.mode=lora finetune.lora.r=2)" = 0 ] || fail "lora train: $(tail -2 $T/j.err)"
"$BIN" eval --model $T/model --adapter $T/lo/final --data $T/train.h5 --seq-len 16 >/dev/null || fail "final/ adapter"
for kv in '"exclude_modules": ["q_proj"]' '"modules_to_save": ["lm_head"]' '"layer_replication": [[0, 1]]' \
          '"trainable_token_indices": [1]' '"lora_bias": true' '"use_qalora": true' '"bias": "all"'; do
  rm -rf $T/ad && cp -r $T/lo/final $T/ad
  "$PY" - $T/ad/adapter_config.json "$kv" <<'PYEOF'
import json, sys
c = json.load(open(sys.argv[1])); c.update(json.loads("{" + sys.argv[2] + "}")); json.dump(c, open(sys.argv[1], "w"))
PYEOF
  key=$(echo "$kv" | cut -d'"' -f2)
  bad "$BIN" eval --model $T/model --adapter $T/ad --data $T/train.h5 --seq-len 16 "adapter_config.json: $key"
done
