"""st_cli.py — running the shardtune binary from reference tests, and collecting failed checks so a test
reports all of them before it exits non-zero."""
import os
import subprocess

BIN = os.environ.get("SHARDTUNE_BIN", "build/shardtune")
FAILS = []


def check(cond, msg):
    """Records (and prints) a failed check; the test ends with finish()."""
    if not cond:
        FAILS.append(msg)
        print("FAIL:", msg)


def run(*args, ok=True):
    """Runs `shardtune ARGS`; with ok, any non-zero exit ends the test with its output."""
    p = subprocess.run([BIN, *args], capture_output=True, text=True)
    if ok and p.returncode != 0:
        raise SystemExit(f"shardtune {' '.join(args)} failed:\n{p.stdout}{p.stderr}")
    return p


def finish():
    if FAILS:
        raise SystemExit(f"{len(FAILS)} check(s) failed")
    print("ok")
