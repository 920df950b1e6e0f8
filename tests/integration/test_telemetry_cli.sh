#!/usr/bin/env bash
# test_telemetry_cli.sh — the user-facing telemetry commands against the real API (telemetry_driver):
#   shardtune monitor ADDR --json/--plain: sees summaries of two jobs in a row on the same address
#     (outlives the first job and reconnects), and exits on SIGTERM;
#   shardtune ctl: unreachable address -> one clear line + exit 1; status ok; checkpoint without token
#     refused (exit 1); with --run-dir / --token-file accepted; bad token file refused;
#   shardtune plot: SVG with three panels and one polyline point per metrics line (val loss: per evaluation).
set -euo pipefail
BIN=${SHARDTUNE_BIN:?}
DRIVER=${ST_BUILD_DIR:?}/telemetry_driver
PY=${ST_PYTHON:-/usr/bin/python3}
T=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$T"; }
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PUB=tcp://127.0.0.1:$(port)
CTL=tcp://127.0.0.1:$(port)

# --- ctl against nothing ---
set +e
out=$("$BIN" ctl "$CTL" status --timeout 0.5 2>&1); rc=$?
set -e
[ $rc -eq 1 ] || fail "ctl to a dead address: rc $rc"
echo "$out" | grep -q "no reply from $CTL" || fail "ctl unreachable message: $out"
[ "$(echo "$out" | wc -l)" -eq 1 ] || fail "ctl unreachable: more than one line: $out"

# --- monitor across two jobs ---
"$BIN" monitor "$PUB" --json > "$T/mon.jsonl" 2> "$T/mon.err" &
MON=$!; PIDS+=("$MON")
# No fixed sleeps (a loaded machine stretches every start-up): wait for conditions instead. The monitor
# subscribes once its ZeroMQ context runs (its I/O threads exist: >= 3 threads); the driver's start delay
# (700 ms) then covers ZeroMQ's reconnect interval (100 ms), and the publisher replays recent steps to a
# late subscriber anyway.
for _ in $(seq 300); do [ "$(ls /proc/$MON/task 2>/dev/null | wc -l)" -ge 3 ] && break; sleep 0.1; done
[ "$(ls /proc/$MON/task 2>/dev/null | wc -l)" -ge 3 ] || fail "monitor did not start within 30 s"
# ends FILE: how many job-end events the monitor has printed
ends() { grep -c '"kind": *"end"' "$1" || true; }
wait_ends() { for _ in $(seq 300); do [ "$(ends "$T/mon.jsonl")" -ge "$1" ] && return 0; sleep 0.1; done; return 1; }
"$DRIVER" --world 2 --steps 6 --step-ms 20 --start-delay-ms 700 --run-dir "$T" --publish "$PUB" --control "$CTL" > "$T/job1.out"
wait_ends 1 || fail "monitor saw no job end within 30 s of the first job's end"
sleep 0.5
kill -0 "$MON" 2>/dev/null || fail "monitor exited after the first job ended"
mkdir -p "$T/run2"
"$DRIVER" --world 2 --steps 400 --step-ms 20 --start-delay-ms 700 --run-dir "$T/run2" --publish "$PUB" --control "$CTL" > "$T/job2.out" &
JOB=$!; PIDS+=("$JOB")

# --- ctl against a running job (once it has logged a step) ---
for _ in $(seq 30); do "$BIN" ctl "$CTL" status --timeout 1 2>/dev/null | grep -q "^ok: last step" && break; sleep 0.2; done
"$BIN" ctl "$CTL" status | grep -q "^ok: last step" || fail "ctl status"
# ... and once the monitor has printed one of its steps (a slow machine or a sanitizer build can take
# seconds to reconnect the monitor's subscription to the second job's publisher)
steps_after_end() { awk '/"kind": *"end"/{e=1; next} e && /"topic": *"step"/{n++} END{print n+0}' "$T/mon.jsonl"; }
for _ in $(seq 300); do [ "$(steps_after_end)" -ge 1 ] && break; sleep 0.1; done
[ "$(steps_after_end)" -ge 1 ] || fail "monitor printed no step of the second job within 30 s"
set +e
out=$("$BIN" ctl "$CTL" checkpoint 2>&1); rc=$?
set -e
[ $rc -eq 1 ] && echo "$out" | grep -q "refused: checkpoint refused: a token is required" || fail "checkpoint without token: $rc $out"
cp "$T/run2/control.token" "$T/loose.token"; chmod 644 "$T/loose.token"
set +e
out=$("$BIN" ctl "$CTL" checkpoint --token-file "$T/loose.token" 2>&1); rc=$?
set -e
[ $rc -eq 1 ] && echo "$out" | grep -q "chmod 600" || fail "loose token file accepted: $out"
# flags may come before ADDR and the command too
"$BIN" ctl --run-dir "$T/run2" "$CTL" checkpoint | grep -q "^ok: checkpoint accepted" || fail "checkpoint with token"
"$BIN" ctl "$CTL" stop --token-file "$T/run2/control.token" | grep -q "^ok: stop accepted" || fail "stop with token"
wait "$JOB"
wait_ends 2 || fail "monitor saw $(ends "$T/mon.jsonl") job ends within 30 s of the second job's end"
kill -TERM "$MON"
for i in $(seq 50); do kill -0 "$MON" 2>/dev/null || break; sleep 0.1; done
kill -0 "$MON" 2>/dev/null && fail "monitor ignored SIGTERM"
wait "$MON" || fail "monitor exit status on SIGTERM"

"$PY" - "$T/mon.jsonl" <<'EOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
ends = [i for i, m in enumerate(lines) if m["topic"] == "event" and m["kind"] == "end"]
assert len(ends) == 2, "monitor saw %d job ends" % len(ends)
first = {m["step"] for m in lines[:ends[0]] if m["topic"] == "step"}
assert first == set(range(6)), first
second = [m for m in lines[ends[0]:] if m["topic"] in ("step", "event")]
kinds = [m["kind"] for m in second if m["topic"] == "event"]
assert "checkpoint_saved" in kinds and "stop" in kinds, kinds
assert any(m["topic"] == "step" for m in second)
assert any(m["topic"] == "rank" and m["rank"] == 1 for m in lines)
print("monitor: %d messages over two jobs" % len(lines))
EOF

# --- monitor --plain --count, and a bad address ---
"$DRIVER" --world 1 --steps 50 --step-ms 20 --start-delay-ms 700 --run-dir "$T" --publish "$PUB" --control "$CTL" > /dev/null &
PIDS+=($!)
timeout 20 "$BIN" monitor --plain --count 5 "$PUB" > "$T/plain.txt" || fail "monitor --count"
[ "$(wc -l < "$T/plain.txt")" -eq 5 ] || fail "monitor --plain --count 5 printed $(wc -l < "$T/plain.txt") lines"
grep -Eq "^(step|rank|event) " "$T/plain.txt" || fail "plain format: $(cat "$T/plain.txt")"
set +e
out=$("$BIN" monitor "nonsense://x" 2>&1); rc=$?
set -e
[ $rc -eq 1 ] && echo "$out" | grep -q "bad monitor address" || fail "monitor bad address: $out"
wait

# --- plot ---
mkdir -p "$T/plot"
"$PY" - "$T/plot/metrics.jsonl" <<'EOF'
import json, math, sys
with open(sys.argv[1], "w") as f:
    for s in range(0, 120):
        row = {"step": s, "loss": 3 * math.exp(-s / 30) + 1, "lr": 1e-4 * min(1, (s + 1) / 10),
               "grad_norm": 1.0, "tokens": 512, "tokens_per_s": 700 + s, "step_ms": 100,
               "task_loss": {"qa": 2.5, "chat": 1.5 + 1 / (s + 1)}}
        if s == 60:
            row["resumed"] = True  # the first row after a resume
        if s % 20 == 19:
            row["val_loss"] = {"qa": 2.6, "chat": None}  # null: a task without a val split
        f.write(json.dumps(row) + "\n")
    f.write('{"step": 120, "loss"')  # partial last line of a run still writing
EOF
"$BIN" plot "$T/plot" --out "$T/plot/p.svg" | grep -q "120 steps, 1 lines skipped" || fail "plot summary line"
"$PY" - "$T/plot/p.svg" <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
ns = "{http://www.w3.org/2000/svg}"
polys = root.findall(".//" + ns + "polyline")
assert len(polys) == 6, "want loss, 2 task losses, val[qa], lr, tokens/s: %d" % len(polys)
npoints = sorted(len(p.get("points").split()) for p in polys)
assert npoints == [6, 120, 120, 120, 120, 120], npoints  # val[qa]: the 6 evaluated steps
texts = [t.text for t in root.iter(ns + "text")]
for want in ("loss", "learning rate", "tokens/s", "step", "loss[qa]", "loss[chat]", "val[qa]"):
    assert want in texts, want
resumes = [l for l in root.iter(ns + "line") if l.get("class") == "resume"]
assert len(resumes) == 1 and "resume" in texts, "one resume marker"
print("plot: 5 series x 120 points + val loss x 6, a resume marker, %d labels" % len(texts))
EOF
# the same as PNG: decoded here with zlib alone (no image library), checked for the series colours and
# the dashed resume marker at step 60
"$BIN" plot "$T/plot" --out "$T/plot/p.png" | grep -q "wrote .*p.png: 120 steps" || fail "plot png"
# an extension plot does not write is refused by name (it wrote an SVG under a .jpg name), nothing written
for bad in p.jpg p.JPEG p p.svg.gz; do
  set +e; out=$("$BIN" plot "$T/plot" --out "$T/plot/$bad" 2>&1); rc=$?; set -e
  [ $rc -eq 2 ] && [ "$(echo "$out" | wc -l)" = 1 ] && echo "$out" | grep -q -- "--out $T/plot/$bad: .*(plot writes FILE.svg or FILE.png)" \
    || fail "plot --out $bad: exit $rc: $out"
  [ ! -e "$T/plot/$bad" ] || fail "plot --out $bad wrote a file"
done
"$BIN" plot "$T/plot" --out "$T/plot/P.SVG" >/dev/null && head -c 200 "$T/plot/P.SVG" | grep -q "<svg" || fail "plot .SVG"
echo "ok: plot refuses an extension it does not write"
"$PY" - "$T/plot/p.png" <<'EOF'
import struct, sys, zlib
b = open(sys.argv[1], "rb").read()
assert b[:8] == b"\x89PNG\r\n\x1a\n", "PNG signature"
pos, idat, size = 8, b"", None
while pos < len(b):
    n, kind = struct.unpack(">I4s", b[pos:pos + 8]); data = b[pos + 8:pos + 8 + n]
    assert zlib.crc32(kind + data) == struct.unpack(">I", b[pos + 8 + n:pos + 12 + n])[0], kind
    if kind == b"IHDR": size = struct.unpack(">IIBB", data[:10])
    if kind == b"IDAT": idat += data
    pos += 12 + n
w, h, depth, ctype = size
assert (w, h, depth, ctype) == (900, 945, 8, 2), size
raw = zlib.decompress(idat); row = 3 * w + 1
px = lambda x, y: raw[y * row + 1 + 3 * x:y * row + 4 + 3 * x]
count = lambda rgb: sum(px(x, y) == rgb for y in range(h) for x in range(w))
for name, rgb in (("loss", b"\x1f\x77\xb4"), ("loss[qa]", b"\xff\x7f\x0e"), ("val[qa]", b"\xd6\x27\x28")):
    assert count(rgb) > 20, name
x = round(90 + 60 / 119 * 650)  # ML + (60 - 0) / (119 - 0) * plot width
gray = sum(px(x + d, y) == b"\x55\x55\x55" for y in range(30, 270) for d in (-1, 0, 1))
assert gray > 60, "resume marker at step 60: %d px" % gray
print("plot png: %dx%d, series colours and the resume marker present" % (w, h))
EOF
set +e
"$BIN" plot "$T/nothing" --out "$T/x.svg" 2>"$T/err"; rc=$?
set -e
[ $rc -eq 1 ] && grep -q "nothing/metrics.jsonl" "$T/err" || fail "plot of a missing run dir"
echo "PASS test_telemetry_cli"
