"""test_telemetry_client.py — an independent client of the telemetry protocol (docs/telemetry.md).

Runs tests/tools/telemetry_driver (real telemetry + monitor API, real sockets on loopback, ranks as
processes) and checks it from Python with pyzmq and a hand-written protobuf wire decoder (no generated
code, so the C encoder is checked against the wire format itself):
  1. a StepSummary for every step, with loss / task losses / tokens aggregated as this file recomputes them;
  2. SIGSTOP of one rank -> an alert naming that rank and its last phase within stall_after_s + 2 s,
     SIGCONT -> a "recovered" event;
  3. control: status without token ok; checkpoint without / with a wrong token refused; garbage,
     multi-frame and oversized requests refused (and the server keeps answering); with the token
     accepted (checkpoint_saved event), stop accepted (stop event, driver exits);
  4. a rank hung in one phase (heartbeats still flowing) -> "stuck" alert; a slow rank -> "straggler".
"""
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import zmq

BUILD = os.environ.get("ST_BUILD_DIR", "build")
DRIVER = os.path.join(BUILD, "telemetry_driver")
PHASES = ["idle", "data", "forward", "backward", "comm", "optimizer", "checkpoint", "eval"]


# ---- protobuf wire format, by hand ----
def varint(buf, i):
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def fields(buf):
    """Yields (field number, wire type, value) for one message."""
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = varint(buf, i)
        elif wt == 1:
            v = buf[i:i + 8]
            i += 8
        elif wt == 2:
            n, i = varint(buf, i)
            v = buf[i:i + n]
            i += n
        elif wt == 5:
            v = buf[i:i + 4]
            i += 4
        else:
            raise ValueError("wire type %d" % wt)
        yield num, wt, v


def signed(v):
    return v - (1 << 64) if v >= 1 << 63 else v


def decode(buf, schema):
    """schema: {field: (name, kind)} with kind in int, double, str, bool, map_double."""
    out = {name: ({} if kind == "map_double" else "" if kind == "str" else 0) for name, kind in schema.values()}
    for num, wt, v in fields(buf):
        if num not in schema:
            continue
        name, kind = schema[num]
        if kind == "int":
            out[name] = signed(v)
        elif kind == "bool":
            out[name] = bool(v)
        elif kind == "double":
            out[name] = struct.unpack("<d", v)[0]
        elif kind == "str":
            out[name] = bytes(v).decode()
        elif kind == "map_double":
            entry = {n: val for n, _, val in fields(v)}
            out[name][bytes(entry.get(1, b"")).decode()] = struct.unpack("<d", entry.get(2, b"\0" * 8))[0]
    return out


HEARTBEAT = {2: ("rank", "int"), 3: ("host", "str"), 4: ("step", "int"), 5: ("phase", "int"),
             6: ("phase_seconds", "double"), 7: ("rss_bytes", "int"), 8: ("pid", "int")}
SUMMARY = {2: ("step", "int"), 3: ("loss", "double"), 4: ("task_loss", "map_double"), 5: ("grad_norm", "double"),
           6: ("lr", "double"), 7: ("tokens_per_s", "double"), 8: ("mfu", "double"), 9: ("stage", "int"),
           10: ("world_size", "int"), 11: ("tokens", "int"), 12: ("step_seconds", "double")}
EVENT = {2: ("kind", "str"), 3: ("step", "int"), 4: ("text", "str"), 5: ("rank", "int")}
ALERT = {2: ("kind", "str"), 3: ("rank", "int"), 4: ("host", "str"), 5: ("step", "int"), 6: ("phase", "int"),
         7: ("seconds", "double"), 8: ("text", "str")}
REPLY = {2: ("ok", "bool"), 3: ("text", "str"), 4: ("step", "int"), 5: ("control_bits", "int")}
SCHEMAS = {b"rank": HEARTBEAT, b"step": SUMMARY, b"event": EVENT, b"alert": ALERT}


def encode_request(command, token=""):
    out = bytes([0x08, 1, 0x10, command])
    if token:
        t = token.encode()
        out += bytes([0x1A, len(t)]) + t
    return out


# ---- driver plumbing ----
def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Job:
    def __init__(self, tmp, **kw):
        self.pub = "tcp://127.0.0.1:%d" % free_port()
        self.ctl = "tcp://127.0.0.1:%d" % free_port()
        self.run_dir = tmp
        args = [DRIVER, "--run-dir", tmp, "--publish", self.pub, "--control", self.ctl, "--start-delay-ms", "700"]
        for k, v in kw.items():
            args += ["--" + k.replace("_", "-"), str(v)]
        self.ctx = zmq.Context.instance()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(self.pub)  # before the job binds: ZeroMQ connects when it appears
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        self.pids = {}
        world = int(kw.get("world", 2))
        while len(self.pids) < world:
            line = self.proc.stdout.readline()
            assert line, "driver exited early"
            if line.startswith("RANK"):
                _, r, _, pid = line.split()
                self.pids[int(r)] = int(pid)
        self.last_hb = {}
        self.summaries = {}
        self.events = []
        self.alerts = []

    def poll(self, seconds, until=None):
        """Receives for up to `seconds`; returns early once until() is true."""
        end = time.time() + seconds
        while time.time() < end:
            if until and until():
                return True
            if not self.sub.poll(50):
                continue
            topic, data = self.sub.recv_multipart()
            msg = decode(data, SCHEMAS[topic])
            if topic == b"rank":
                self.last_hb[msg["rank"]] = msg
            elif topic == b"step":
                self.summaries[msg["step"]] = msg
            elif topic == b"event":
                self.events.append(msg)
            elif topic == b"alert":
                self.alerts.append(msg)
        return bool(until and until())

    def control(self, payload, frames=None, timeout_ms=5000):
        req = self.ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.setsockopt(zmq.RCVTIMEO, timeout_ms)
        req.connect(self.ctl)
        if frames:
            req.send_multipart(frames)
        else:
            req.send(payload)
        reply = decode(req.recv(), REPLY)
        req.close()
        return reply

    def finish(self, timeout=20):
        out, _ = self.proc.communicate(timeout=timeout)
        self.sub.close()
        return self.proc.returncode, out


def expected_summary(step, world):
    tokens = [100 + 10 * r for r in range(world)]
    loss = [2.0 + 1.0 / (1 + step) + 0.1 * r for r in range(world)]
    ta = [60 + 10 * r for r in range(world)]
    total = sum(l * t for l, t in zip(loss, tokens)) / sum(tokens)
    a = sum((l + 0.5) * t for l, t in zip(loss, ta)) / sum(ta)
    b = sum((l - 0.5) * 40 for l in loss) / (40 * world)
    return total, {"a": a, "b": b}, sum(tokens)


def close(x, y):
    return abs(x - y) <= 1e-9 * max(1.0, abs(y))


def test_every_step_summarised(tmp):
    world, steps = 3, 15
    job = Job(tmp, world=world, steps=steps, step_ms=30, heartbeat_ms=100)
    job.poll(30, until=lambda: any(e["kind"] == "end" for e in job.events))
    rc, out = job.finish()
    assert rc == 0, out
    assert sorted(job.summaries) == list(range(steps)), "summaries for steps %s" % sorted(job.summaries)
    for s, m in job.summaries.items():
        loss, tasks, tokens = expected_summary(s, world)
        assert close(m["loss"], loss), (s, m["loss"], loss)
        assert set(m["task_loss"]) == {"a", "b"} and all(close(m["task_loss"][k], tasks[k]) for k in tasks), m
        assert m["tokens"] == tokens and m["world_size"] == world and m["stage"] == 1
        assert close(m["grad_norm"], 1 + 0.01 * s) and close(m["lr"], 0.001 * (s + 1)), m
        assert m["step_seconds"] > 0.02 and close(m["tokens_per_s"], tokens / m["step_seconds"]), m
    assert sorted(job.last_hb) == list(range(world))
    for r, hb in job.last_hb.items():
        assert hb["host"] == socket.gethostname() and hb["rss_bytes"] > 1 << 20 and hb["pid"] == job.pids[r], hb
    kinds = [e["kind"] for e in job.events]
    assert kinds[0] == "start" and kinds[-1] == "end", kinds
    assert not job.alerts, job.alerts
    print("ok: %d summaries, aggregates match; %s" % (len(job.summaries), out.strip().splitlines()[-1]))


def test_stall_and_control(tmp):
    stall = 2.0
    job = Job(tmp, world=3, steps=100000, step_ms=50, heartbeat_ms=100, stall_after=stall)
    assert job.poll(15, until=lambda: len(job.summaries) >= 3 and len(job.last_hb) == 3)
    # -- control before the stall --
    token_path = os.path.join(tmp, "control.token")
    assert os.stat(token_path).st_mode & 0o777 == 0o600
    token = open(token_path).read().strip()
    assert len(token) == 32 and int(token, 16) >= 0
    r = job.control(encode_request(0))
    assert r["ok"] and "rank 2" in r["text"], r
    for payload, why in [(encode_request(1), "token is required"), (encode_request(1, "f" * 32), "wrong token"),
                         (b"\xff\xff\xff\x0f\x01", "malformed"), (b"\x00" * 5000, "larger than")]:
        r = job.control(payload)
        assert not r["ok"] and why in r["text"], (payload[:8], r)
    r = job.control(None, frames=[encode_request(0), b"x"])
    assert not r["ok"] and "more than one frame" in r["text"], r
    r = job.control(encode_request(1, token))
    assert r["ok"] and "accepted" in r["text"], r
    assert job.poll(5, until=lambda: any(e["kind"] == "checkpoint_saved" for e in job.events)), job.events
    # -- SIGSTOP rank 2 --
    job.poll(0.3)
    last_phase = job.last_hb[2]["phase"]
    os.kill(job.pids[2], signal.SIGSTOP)
    t0 = time.time()
    got = job.poll(stall + 2.5, until=lambda: any(a["rank"] == 2 for a in job.alerts))
    dt = time.time() - t0
    # the rank's own heartbeat may have left between our last read and the stop: take the newest
    last_phase = job.last_hb[2]["phase"]
    assert got and dt <= stall + 2.0, "no alert for rank 2 within %.1f s (%.1f s)" % (stall + 2, dt)
    a = [a for a in job.alerts if a["rank"] == 2][0]
    assert a["kind"] == "stalled" and a["phase"] == last_phase, a
    assert "rank 2" in a["text"] and PHASES[last_phase] in a["text"] and socket.gethostname() in a["text"], a
    print("ok: SIGSTOP -> alert after %.2f s: %s" % (dt, a["text"]))
    os.kill(job.pids[2], signal.SIGCONT)
    t1 = time.time()
    got = job.poll(5, until=lambda: any(e["kind"] == "recovered" and e["rank"] == 2 for e in job.events))
    assert got, job.events
    print("ok: SIGCONT -> recovered after %.2f s" % (time.time() - t1))
    # -- stop --
    r = job.control(encode_request(2, token))
    assert r["ok"], r
    assert job.poll(5, until=lambda: any(e["kind"] == "stop" for e in job.events)), job.events
    rc, out = job.finish()
    assert rc == 0, out
    print("ok: control refused garbage/oversize/multi-frame/no token, accepted token; " + out.strip().splitlines()[-1])


def test_stuck_and_straggler(tmp):
    job = Job(tmp, world=3, steps=40, step_ms=40, heartbeat_ms=100, stall_after=1.0, slow_rank=2, slow_factor=3,
              hang_rank=1, hang_step=8, hang_phase="backward", hang_s=2.0)
    job.poll(40, until=lambda: any(e["kind"] == "end" for e in job.events))
    rc, out = job.finish()
    assert rc == 0, out
    stuck = [a for a in job.alerts if a["kind"] == "stuck"]
    assert stuck and stuck[0]["rank"] == 1 and PHASES[stuck[0]["phase"]] == "backward" and stuck[0]["step"] == 8, job.alerts
    assert "stuck in backward at step 8" in stuck[0]["text"], stuck
    assert any(e["kind"] == "recovered" and e["rank"] == 1 for e in job.events), job.events
    strag = [a for a in job.alerts if a["kind"] == "straggler"]
    assert strag and all(a["rank"] == 2 for a in strag), job.alerts
    assert sorted(job.summaries) == list(range(40))
    print("ok: stuck: %s; straggler: %s" % (stuck[0]["text"], strag[0]["text"]))


def main():
    import tempfile
    if not os.path.exists(DRIVER):
        print("missing %s (build first)" % DRIVER)
        return 1
    for t in (test_every_step_summarised, test_stall_and_control, test_stuck_and_straggler):
        with tempfile.TemporaryDirectory() as tmp:
            t(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
