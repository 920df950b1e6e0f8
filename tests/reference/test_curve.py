"""test_curve.py — `monitor.curve: true` against a REAL `shardtune train` run (2 MPI ranks).

An independent client (pyzmq's own CURVE + the hand-written protobuf decoder of test_telemetry_client.py)
checks:
  1. the job writes RUN_DIR/monitor.key (0600) and monitor.pub (0644), and the public key is the one
     pyzmq derives from the secret key;
  2. a plain SUB (and a CURVE SUB that trusts another server key) receives nothing, while a CURVE SUB with
     monitor.pub receives StepSummaries (which need both ranks' reports over the internal, plain PULL);
  3. `shardtune monitor --run-dir` sees steps; `shardtune ctl status` works with --run-dir and with a copied
     key (--server-key); without a key it times out with the monitor.curve hint; a malformed key file is
     one error line naming it; `ctl stop` with key + token stops the job with exit 85;
  4. the secret key never shows up in the job's output;
  5. a later job in the same run_dir without monitor.curve removes the keys, and plain clients work again.
"""
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_telemetry_client import SCHEMAS, decode, free_port  # noqa: E402
from test_monitor_train import ENV, ST, make_job, start  # noqa: E402


def curve_sub(pub_addr, server_key=None):
    s = zmq.Context.instance().socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RECONNECT_IVL, 50)
    if server_key:
        public, secret = zmq.curve_keypair()  # an ephemeral client identity, as shardtune's clients use
        s.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        s.setsockopt(zmq.CURVE_PUBLICKEY, public)
        s.setsockopt(zmq.CURVE_SECRETKEY, secret)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(pub_addr)
    return s


def drain(sock, summaries):
    """Reads everything waiting; returns the number of messages."""
    n = 0
    while sock.poll(0):
        topic, body = sock.recv_multipart()
        n += 1
        if topic == b"step":
            msg = decode(body, SCHEMAS[topic])
            summaries[msg["step"]] = msg
    return n


def ctl(*args, timeout=30):
    r = subprocess.run([ST, "ctl"] + list(args), env=ENV, capture_output=True, text=True, timeout=timeout)
    return r.returncode, (r.stdout + r.stderr).strip()


def wait_for(path, seconds, proc):
    end = time.time() + seconds
    while time.time() < end and not os.path.exists(path):
        assert proc.poll() is None, "job exited early:\n" + proc.stdout.read()[-3000:]
        time.sleep(0.05)
    assert os.path.exists(path), "%s not created within %d s" % (path, seconds)


def test_curve_job(tmp):
    pub_addr, ctl_addr = "tcp://127.0.0.1:%d" % free_port(), "tcp://127.0.0.1:%d" % free_port()
    job = make_job(tmp, pub_addr, ctl_addr, 100000, extra="checkpoint: { every_steps: 0 }\n")
    run = os.path.join(tmp, "run")
    key_path, pub_path = os.path.join(run, "monitor.key"), os.path.join(run, "monitor.pub")
    plain = curve_sub(pub_addr)  # connected before the job starts: it would get everything if it could
    p = start(job, 2, "monitor.curve=true")
    try:
        wait_for(pub_path, 60, p)
        # 1. the key files
        assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600, oct(os.stat(key_path).st_mode)
        assert stat.S_IMODE(os.stat(pub_path).st_mode) == 0o644, oct(os.stat(pub_path).st_mode)
        secret = open(key_path, "rb").read().strip()
        server_key = open(pub_path, "rb").read().strip()
        assert len(server_key) == 40 and len(secret) == 40, (server_key, len(secret))
        assert zmq.curve_public(secret) == server_key, "monitor.pub does not belong to monitor.key"
        # 2. only the CURVE subscriber with the job's key hears the job
        impostor = curve_sub(pub_addr, zmq.curve_keypair()[0])
        good = curve_sub(pub_addr, server_key)
        got, plain_n, impostor_n = {}, 0, 0
        t0 = time.time()
        while time.time() - t0 < 60 and (len(got) < 3 or time.time() - t0 < 3):
            good.poll(100)
            drain(good, got)
            plain_n += drain(plain, {})
            impostor_n += drain(impostor, {})
        assert len(got) >= 3, "CURVE SUB got %d StepSummaries in 60 s" % len(got)
        assert plain_n == 0 and impostor_n == 0, (plain_n, impostor_n)
        assert all(s["world_size"] == 2 and s["loss"] > 0 for s in got.values()), got
        waited = time.time() - t0
        # 3. the shardtune clients
        mon = subprocess.run([ST, "monitor", pub_addr, "--run-dir", run, "--json", "--count", "3", "--timeout", "30"],
                             env=ENV, capture_output=True, text=True, timeout=60)
        assert mon.returncode == 0 and mon.stdout.count('"topic"') >= 3, mon.stdout + mon.stderr
        mon_plain = subprocess.run([ST, "monitor", pub_addr, "--json", "--timeout", "2"], env=ENV,
                                   capture_output=True, text=True, timeout=60)
        assert mon_plain.returncode == 0 and mon_plain.stdout == "", mon_plain.stdout[:500]
        rc, out = ctl(ctl_addr, "status", "--run-dir", run)
        assert rc == 0 and out.startswith("ok: last step"), out
        copy = os.path.join(tmp, "copied.pub")
        shutil.copy(pub_path, copy)
        rc, out = ctl(ctl_addr, "status", "--server-key", copy)
        assert rc == 0 and out.startswith("ok:"), out
        rc, out = ctl(ctl_addr, "status", "--timeout", "2")
        assert rc == 1 and "no reply" in out and "pass --run-dir or --server-key" in out, out
        assert len(out.splitlines()) == 1, out
        bad = os.path.join(tmp, "bad.pub")
        with open(bad, "w") as f:
            f.write("not a key\n")
        for cmd in (["ctl", ctl_addr, "status", "--server-key", bad], ["monitor", pub_addr, "--server-key", bad]):
            r = subprocess.run([ST] + cmd, env=ENV, capture_output=True, text=True, timeout=30)
            err = r.stderr.strip()
            assert r.returncode == 1 and bad in err and len(err.splitlines()) == 1 and not r.stdout, (cmd, r)
        # the token still matters: a CURVE connection without it cannot stop the job
        rc, out = ctl(ctl_addr, "stop", "--server-key", copy)
        assert rc == 1 and out.startswith("refused:"), out
        rc, out = ctl(ctl_addr, "stop", "--run-dir", run)
        assert rc == 0, out
        out = p.communicate(timeout=120)[0]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 85, "exit %d\n%s" % (p.returncode, out[-2000:])
    # 4. hygiene
    assert secret.decode() not in out, "the secret key was printed"
    print("ok: CURVE job: %d summaries to the keyed SUB in %.1f s, 0 to plain/impostor SUBs; ctl status with "
          "--run-dir and --server-key; keyless ctl timed out with the hint; stop -> exit 85" % (len(got), waited))
    return pub_addr, ctl_addr, job, run


def test_plain_job_removes_keys(tmp, pub_addr, ctl_addr, job, run):
    """5. the same run_dir without monitor.curve: stale keys go, so --run-dir clients connect plain."""
    sub = curve_sub(pub_addr)
    p = start(job, 1)
    try:
        got = {}
        end = time.time() + 60
        while time.time() < end and not got:
            sub.poll(100)
            drain(sub, got)
        assert got, "plain SUB got no StepSummary from a job without monitor.curve"
        assert not os.path.exists(os.path.join(run, "monitor.pub")), "stale monitor.pub left behind"
        assert not os.path.exists(os.path.join(run, "monitor.key")), "stale monitor.key left behind"
        rc, out = ctl(ctl_addr, "stop", "--run-dir", run)
        assert rc == 0, out
        out = p.communicate(timeout=120)[0]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 85, "exit %d\n%s" % (p.returncode, out[-2000:])
    print("ok: a later job without monitor.curve removed the keys; plain SUB and ctl --run-dir work")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        addrs = test_curve_job(tmp)
        test_plain_job_removes_keys(tmp, *addrs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
