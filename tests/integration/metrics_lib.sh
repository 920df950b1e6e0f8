# metrics_lib.sh — reading RUN_DIR/metrics.jsonl in shell tests (sourced; not a test itself). Needs $PY.

# losses RUN_DIR: "step loss" per step, the LAST occurrence of each step (resumed runs append)
losses() {
  "$PY" - "$1/metrics.jsonl" <<'PYEOF'
import json, sys
last = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    last[r["step"]] = r["loss"]
for s in sorted(last):
    print(s, repr(last[s]))
PYEOF
}

# close_losses A B TOL: every step's loss within TOL relative
close_losses() {
  "$PY" - "$1" "$2" "$3" <<'PYEOF'
import sys
a = dict(l.split() for l in open(sys.argv[1]))
b = dict(l.split() for l in open(sys.argv[2]))
tol = float(sys.argv[3])
assert a.keys() == b.keys(), f"steps differ: {sorted(a)} vs {sorted(b)}"
worst = max(abs(float(a[k]) - float(b[k])) / abs(float(a[k])) for k in a)
print(f"max relative loss difference {worst:.3g} over {len(a)} steps")
sys.exit(0 if worst <= tol else 1)
PYEOF
}
