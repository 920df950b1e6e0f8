"""test_monitor_train.py — monitoring and control of a REAL `shardtune train` run (2 MPI ranks).

An independent client (pyzmq + the hand-written protobuf decoder of test_telemetry_client.py) checks:
  1. a StepSummary for every step of a 2-rank run, whose loss equals metrics.jsonl;
  2. SIGSTOP of one rank -> an alert naming that rank (and its phase) within stall_after_s + 2 s,
     SIGCONT -> a "recovered" event, and the run still finishes;
  3. state-changing control without the job token is refused; STATUS works without it;
  4. `shardtune monitor --json` outlives a job that ends and picks up the next job on the same address.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_telemetry_client import (ALERT, EVENT, PHASES, REPLY, SCHEMAS, decode, encode_request,  # noqa: E402
                                   free_port)

ST = os.environ.get("SHARDTUNE_BIN", "build/shardtune")
SRC = os.environ.get("ST_SOURCE_DIR", ".")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def sh(*args):
    subprocess.run(args, check=True, env=ENV, stdout=subprocess.DEVNULL)


def make_job(tmp, pub, ctl, steps, extra=""):
    model, data = os.path.join(tmp, "model"), os.path.join(tmp, "d.h5")
    if not os.path.exists(model):
        sh(ST, "init-model", "--family", "llama", "--layers", "2", "--dim", "64", "--heads", "4", "--kv-heads", "2",
           "--vocab", "256", "--max-seq", "64", "--out", model)
        sh("/usr/bin/python3", os.path.join(SRC, "scripts/make_demo_data.py"), "--out", os.path.join(tmp, "d.jsonl"),
           "--docs", "200")
        sh(ST, "data", "pack", "--jsonl", os.path.join(tmp, "d.jsonl"), "--out", data, "--vocab", "256")
    job = os.path.join(tmp, "job.yaml")
    with open(job, "w") as f:
        f.write("model: { path: %s }\nrun_dir: %s/run\ntrain: { steps: %d, micro_batch: 2, seq_len: 32, lr: 1.0e-3,"
                " warmup_steps: 2 }\ntasks:\n  - { name: demo, path: %s }\n"
                "monitor: { publish: \"%s\", control: \"%s\", heartbeat_ms: 100, stall_after_s: 1.5 }\n%s"
                % (model, tmp, steps, data, pub, ctl, extra))
    return job


def start(job, np=2, *extra):
    return subprocess.Popen(["mpirun", "--oversubscribe", "-np", str(np), ST, "train", job] + list(extra), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class Sub:
    def __init__(self, pub):
        self.ctx = zmq.Context.instance()
        self.s = self.ctx.socket(zmq.SUB)
        self.s.setsockopt(zmq.SUBSCRIBE, b"")
        self.s.setsockopt(zmq.RECONNECT_IVL, 10)  # catch the job's first messages
        self.s.connect(pub)
        self.summaries, self.alerts, self.events, self.ranks = {}, [], [], {}
        self.seen = set()  # the job replays recent step/event messages to all whenever a subscriber joins

    def poll(self, seconds, until=None):
        end = time.time() + seconds
        while time.time() < end:
            if self.s.poll(100):
                topic, body = self.s.recv_multipart()
                if topic in (b"step", b"event") and (topic, body) in self.seen:
                    continue
                self.seen.add((topic, body))
                msg = decode(body, SCHEMAS[topic])
                if topic == b"step":
                    self.summaries[msg["step"]] = msg
                elif topic == b"alert":
                    self.alerts.append(dict(msg, t=time.time()))
                elif topic == b"event":
                    self.events.append(dict(msg, t=time.time()))
                elif topic == b"rank":
                    self.ranks[msg["rank"]] = msg
            if until and until():
                return True
        return False


def request(ctl, command, token=""):
    s = zmq.Context.instance().socket(zmq.REQ)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(ctl)
    s.send(encode_request(command, token))
    reply = decode(s.recv(), REPLY)
    s.close()
    return reply


def rank_pids(proc):
    """pids of this job's shardtune processes (children of our mpirun), by OMPI_COMM_WORLD_RANK."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            status = open("/proc/%s/status" % pid).read()
            ppid = int(status.split("PPid:")[1].split()[0])
            if ppid != proc.pid:
                continue
            cmd = open("/proc/%s/cmdline" % pid, "rb").read().split(b"\0")
            env = open("/proc/%s/environ" % pid, "rb").read().split(b"\0")
        except OSError:
            continue
        if not cmd or not cmd[0].endswith(b"shardtune") or b"train" not in cmd:
            continue
        for e in env:
            if e.startswith(b"OMPI_COMM_WORLD_RANK="):
                out[int(e.split(b"=")[1])] = int(pid)
    return out


def test_summaries_and_stall(tmp):
    pub, ctl = "tcp://127.0.0.1:%d" % free_port(), "tcp://127.0.0.1:%d" % free_port()
    steps = 300  # long enough to still run for a while after SIGCONT
    job = make_job(tmp, pub, ctl, steps)
    sub = Sub(pub)
    p = start(job)
    assert sub.poll(60, until=lambda: len(sub.summaries) >= 3), "no StepSummary within 60 s"
    # control without the token is refused, status is answered
    r = request(ctl, 2)  # STOP without token
    assert not r["ok"], r
    r = request(ctl, 2, "0" * 32)  # STOP with a wrong token
    assert not r["ok"], r
    r = request(ctl, 0)
    assert r["ok"], r
    # freeze rank 1
    pids = rank_pids(p)
    assert 1 in pids, pids
    t0 = time.time()
    os.kill(pids[1], signal.SIGSTOP)
    got = sub.poll(1.5 + 2 + 1, until=lambda: any(a["rank"] == 1 for a in sub.alerts))
    os.kill(pids[1], signal.SIGCONT)
    assert got, "no alert for the stopped rank: %s" % sub.alerts
    alert = [a for a in sub.alerts if a["rank"] == 1][0]
    delay = alert["t"] - t0
    assert delay <= 1.5 + 2, "alert after %.2f s" % delay
    assert "rank 1" in alert["text"], alert
    sub.poll(60, until=lambda: any(e["kind"] == "end" for e in sub.events))
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 0, out
    assert any(e["kind"] == "recovered" and e["rank"] == 1 for e in sub.events), (sub.events, sub.alerts)
    metrics = [json.loads(l) for l in open(os.path.join(tmp, "run", "metrics.jsonl"))]
    assert sorted(sub.summaries) == list(range(1, steps + 1)), sorted(sub.summaries)
    for m in metrics:
        s = sub.summaries[m["step"]]
        assert abs(s["loss"] - m["loss"]) <= 1e-6 * abs(m["loss"]), (s, m)
    print("ok: %d StepSummaries match metrics.jsonl; alert after %.2f s: %s [phase %s]; token refused"
          % (len(sub.summaries), delay, alert["text"], PHASES[alert["phase"]]))


def test_monitor_outlives_jobs(tmp):
    """One `shardtune monitor --json` process follows a job, survives its death, and finds the next job on
    the same address. Jobs are long and are killed once the monitor has seen them, so timing never matters."""
    import queue
    import threading
    pub, ctl = "tcp://127.0.0.1:%d" % free_port(), "tcp://127.0.0.1:%d" % free_port()
    mon = subprocess.Popen([ST, "monitor", pub, "--json"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in mon.stdout], daemon=True).start()
    seen = []
    for run in range(2):
        job = make_job(tmp, pub, ctl, 100000, extra="seed: %d\n" % (run + 1))
        p = start(job, 1, "run_dir=%s/run%d" % (tmp, run))
        steps = 0
        deadline = time.time() + 60
        while steps < 5 and time.time() < deadline:
            try:
                msg = json.loads(lines.get(timeout=1))
            except (queue.Empty, ValueError):
                continue
            steps += msg.get("topic") == "step"
        p.kill()
        p.wait()
        subprocess.run(["pkill", "-9", "-f", "run_dir=%s/run%d" % (tmp, run)])
        assert steps >= 5, "monitor saw %d step summaries of job %d" % (steps, run)
        seen.append(steps)
        time.sleep(0.5)
    assert mon.poll() is None, "monitor exited"
    mon.send_signal(signal.SIGTERM)
    mon.wait(timeout=10)
    print("ok: one monitor followed two jobs in a row (saw >= %s step summaries of each)" % seen)


def ctl(addr, command, run_dir):
    r = subprocess.run([ST, "ctl", addr, command, "--run-dir", run_dir], env=ENV, capture_output=True, text=True,
                       timeout=30)
    return r.returncode, (r.stdout + r.stderr).strip()


def test_control(tmp):
    """`shardtune ctl` against a real 2-rank run: checkpoint at the next boundary, pause/resume, stop =
    checkpoint + exit 85; without the token the same commands are refused."""
    pub, addr = "tcp://127.0.0.1:%d" % free_port(), "tcp://127.0.0.1:%d" % free_port()
    job = make_job(tmp, pub, addr, 100000, extra="checkpoint: { every_steps: 0 }\n")
    run = os.path.join(tmp, "run")
    ckdir = os.path.join(run, "checkpoints")
    sub = Sub(pub)
    p = start(job)
    assert sub.poll(30, until=lambda: len(sub.summaries) >= 3), "no StepSummary within 30 s"
    # a forged token file is refused
    forged = os.path.join(tmp, "forged")
    os.makedirs(forged, exist_ok=True)
    with open(os.path.join(forged, "control.token"), "w") as f:
        f.write("f" * 32)
    os.chmod(os.path.join(forged, "control.token"), 0o600)
    rc, out = ctl(addr, "checkpoint", forged)
    assert rc != 0, out
    # checkpoint now
    rc, out = ctl(addr, "checkpoint", run)
    assert rc == 0, out
    assert sub.poll(30, until=lambda: any(e["kind"] == "checkpoint_saved" for e in sub.events)), sub.events
    saved = [e for e in sub.events if e["kind"] == "checkpoint_saved"][0]
    files = [f for f in os.listdir(ckdir) if f.endswith(".h5")]
    assert files, "no checkpoint file after ctl checkpoint"
    # pause: no new summaries for a second, then resume
    rc, out = ctl(addr, "pause", run)
    assert rc == 0, out
    sub.poll(1.0)
    paused_at = max(sub.summaries)
    sub.poll(1.5)
    assert max(sub.summaries) <= paused_at + 1, "steps advanced while paused: %d -> %d" % (paused_at, max(sub.summaries))
    rc, out = ctl(addr, "resume", run)
    assert rc == 0, out
    assert sub.poll(30, until=lambda: max(sub.summaries) > paused_at + 3), "no progress after resume"
    # stop: checkpoint at the boundary, exit 85
    rc, out = ctl(addr, "stop", run)
    assert rc == 0, out
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 85, "exit %d\n%s" % (p.returncode, out[-2000:])
    latest = open(os.path.join(ckdir, "latest")).read().strip()
    v = subprocess.run([ST, "ckpt", "verify", os.path.join(ckdir, latest)], env=ENV, capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    print("ok: ctl checkpoint -> %s (event at step %d); pause held at step %d; stop -> exit 85 with %s verified"
          % (files[0], saved["step"], paused_at, latest))


def main():
    for t in (test_summaries_and_stall, test_control, test_monitor_outlives_jobs):
        with tempfile.TemporaryDirectory() as tmp:
            t(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
