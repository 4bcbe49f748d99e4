"""`frameshm run` end to end: one command starts capture (test pattern), inference,
controller and gateway as separate processes; the page is reachable at the printed URL
(with its random token, and only with it) and frames flow;
Ctrl-C (SIGINT) stops everything and nothing is left in the stream root or among the
message queues. A role that dies is not restarted: the pipeline stops with status 1."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import frameshm
from fshm_helpers import queue_exists, stream_dirs, wait_until
from test_gateway import all_queues, free_port, http_get, recv_frames, split_message, ws_url


class Run:
    def __init__(self, *argv):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "frameshm", "run", *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
        self.out, self.err = [], []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, k=sink: [k.append(line) for line in s], daemon=True).start()

    def url(self, timeout=40.0) -> str:
        def found():
            m = re.search(r"open (http://\S+)", "".join(self.out))
            assert self.proc.poll() is None, f"frameshm run exited early: {''.join(self.err)[-3000:]}"
            return m and m.group(1)

        return wait_until(found, timeout, interval=0.1, what="the page URL on stdout")

    def children(self):
        return [int(p) for p in re.findall(r"frameshm\.run\[\d+\] INFO: started \w+ \(pid (\d+)\)", "".join(self.err))]

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_run_starts_the_pipeline_and_ctrl_c_leaves_nothing(shm_base):
    port = free_port()
    run = Run("--port", str(port), "--set", "capture.standby_fps=15")
    try:
        url = run.url()
        token = re.fullmatch(rf"http://127\.0\.0\.1:{port}/\?token=([A-Za-z0-9_-]{{32}})", url).group(1)
        st, _, body = http_get(url)
        assert st == 200 and b"<canvas" in body
        assert http_get(f"http://127.0.0.1:{port}/")[0] == 401
        msgs = recv_frames(ws_url(url), 10, timeout=30)
        seqs = [split_message(m)[0]["seq"] for m in msgs]
        assert seqs == sorted(seqs) and len(set(seqs)) == 10
        pids = run.children()
        assert len(pids) == 4 and all(alive(p) for p in pids)
        for p in pids:  # the token goes to the gateway by its environment, not where ps shows it
            with open(f"/proc/{p}/cmdline") as f:
                assert token not in f.read()
        # every role is up: streams, metrics, consumers (queues) of the pipeline
        names = wait_until(lambda: (lambda n: n if {"cam0", "cam0.detections", "cam0.capture", "cam0.inference",
                                                    "cam0.controller", "cam0.gateway"} <= n else None)(
            {s["name"] for s in frameshm.list_streams(sample_s=0)}), 30, what="all streams")
        queues = wait_until(lambda: (lambda q: q if len(q) >= 3 else None)(all_queues()), 20,
                            what="inference, gateway and controller queues")
        assert all(queue_exists(q) for q in queues)
        run.proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert run.proc.wait(30) == 0, "".join(run.err)[-3000:]
    finally:
        run.close()
    err = "".join(run.err)
    for role in ("capture", "inference", "controller", "gateway"):
        assert re.search(rf"frameshm\.{role}\[\d+\] INFO: stopped", err), (role, err[-3000:])
    assert "pipeline stopped" in err and "Traceback" not in err
    assert f"serving {url} (page and /ws)" in err, "the gateway checks the token frameshm run printed"
    assert not any(alive(p) for p in pids)
    assert stream_dirs(shm_base) == [], names
    assert [q for q in queues if queue_exists(q)] == []


def test_run_does_not_restart_a_dead_role(shm_base):
    port = free_port()
    run = Run("--port", str(port), "--token", "none")  # (and the token opt-out reaches the gateway)
    try:
        assert run.url() == f"http://127.0.0.1:{port}/"
        pids = run.children()
        queues = wait_until(lambda: (lambda q: q if len(q) >= 3 else None)(all_queues()), 20, what="queues")
        inference = pids[2]
        os.kill(inference, signal.SIGKILL)
        assert run.proc.wait(40) == 1
    finally:
        run.close()
    err = "".join(run.err)
    assert "inference exited unexpectedly (signal SIGKILL); stopping the pipeline (nothing is restarted)" in err
    assert "serving without an access token (token = 'none')" in err
    assert len(re.findall(r"INFO: started", err)) == 4
    time.sleep(0.2)
    assert not any(alive(p) for p in pids)
    assert stream_dirs(shm_base) == []
    assert [q for q in queues if queue_exists(q)] == []


def test_run_reports_bad_configuration_before_starting_anything(shm_base, tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text("[gateway]\nqaulity = 50\n")
    r = subprocess.run([sys.executable, "-m", "frameshm", "run", "--config", str(bad)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert f"{bad}: unknown key 'qaulity' in [gateway] (did you mean 'quality'?)" in r.stderr
    assert "started" not in r.stderr and stream_dirs(shm_base) == []
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "frameshm", "run", "--port", str(busy)], capture_output=True,
                           text=True, timeout=60)
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{busy}" in r.stderr, r.stderr
