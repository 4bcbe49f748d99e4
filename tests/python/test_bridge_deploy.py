"""The bridge's deployments as docs/bridge.md describes them, with real Zenoh sessions in
real processes: three hosts behind a router (network namespaces in a star, the router a
`frameshm bridge --mode router` on the hub), and mutual TLS between two bridges (certificates
made here with openssl), including a peer whose certificate the other side does not trust."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import frameshm
from fshm_helpers import frame_seq_ok
from test_bridge import bridges, free_port, name, producer, status  # noqa: F401  (fixtures)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "harness"))
from netstar import Star  # noqa: E402

SHAPE = (240, 320, 3)

DETECTOR = """
src, dst = {src!r}, {dst!r}
r = frameshm.Reader(src, consumer="det", spin=False)
w = frameshm.Writer(dst, shape=(4,), dtype="float32", nslots=8)
say("READY")
while not stopped():
    try:
        f = r.wait_next(0.5)
    except frameshm.Timeout:
        continue
    # a "detection" that names its frame: the seq embedded in the frame and its byte sum
    w.publish(np.array([f.seq % 65536, f.array[0, 0, 0], f.array.shape[0], f.array.shape[1]], np.float32),
              ref_seq=f.seq)
w.close()
"""


def test_three_hosts_through_a_router(spawn, bridges, name, tmp_path):  # noqa: F811
    """docs/bridge.md's router topology: a camera host exports a stream, a GPU host imports
    it and exports detections, an operator host imports only the detections; all three are
    clients of a router on a fourth host and reach only it. Frames arrive whole and in order
    on the GPU host, detections tied to them (ref_seq) on the operator's, and the router
    forwards the camera stream only where it is imported: the operator's link carries a
    small fraction of the camera stream's bytes."""
    assert os.geteuid() == 0, "the deployment tests make network namespaces: they need root"
    det = name + ".d"
    with Star(["cam", "gpu", "op"], hub="r") as net:
        port = 7447
        router = bridges("r", "--mode", "router", "--listen", f"tcp/0.0.0.0:{port}", "--frames", "rtr",
                         label="router", prefix=net.prefix("r"))
        prod = producer(spawn, name, shape=SHAPE, fps=30, ns="a")
        cam = bridges("a", "--mode", "client", "--connect", f"tcp/{net.hub_addr('cam')}:{port}",
                      "--export", name, "--frames", name, label="cam", prefix=net.prefix("cam"))
        gpu = bridges("b", "--mode", "client", "--connect", f"tcp/{net.hub_addr('gpu')}:{port}",
                      "--import", name, "--export", det, "--frames", name, label="gpu", prefix=net.prefix("gpu"))
        gpu.expect(f"{name}: frames arriving")
        detector = spawn(DETECTOR.format(src=name, dst=det), label="detector",
                         env_extra={"FRAMESHM_NAMESPACE": "b"})
        detector.expect("READY", timeout=30)
        op = bridges("c", "--mode", "client", "--connect", f"tcp/{net.hub_addr('op')}:{port}",
                     "--import", det, "--frames", det, label="op", prefix=net.prefix("op"))
        op.expect(f"{det}: frames arriving", timeout=60)

        rx0 = {h: net.rx_bytes(h) for h in ("gpu", "op")}
        frames, dets = [], []
        with frameshm.Reader(name, namespace="b") as rf, frameshm.Reader(det, namespace="c") as rd:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 5.0 or len(dets) < 20:
                assert time.monotonic() - t0 < 60, (len(frames), len(dets))
                f = rf.wait_latest(5.0)
                frames.append((f.seq, frame_seq_ok(f.array), f.array.shape))
                d = rd.read_latest(copy=False)
                if d is not None and (not dets or d.seq != dets[-1][0]):
                    item = (d.seq, d.ref_seq, d.array.copy())
                    if d.valid():
                        dets.append(item)
        rx = {h: net.rx_bytes(h) - rx0[h] for h in rx0}
        st = status("r", "rtr")
        for b in (op, gpu, cam, router):
            b.stop()
        detector.stop()
        prod.stop()

    seqs = [s for s, _, _ in frames]
    assert all(ok == s for s, ok, _ in frames), "camera frames arrive whole on the GPU host"
    assert all(shape == SHAPE for _, _, shape in frames)
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # detections on the operator's host name a camera frame the GPU host had
    for _, ref, arr in dets:
        assert ref is not None and int(arr[0]) == ref % 65536 and tuple(arr[2:]) == SHAPE[:2]
    assert [r for _, r, _ in dets] == sorted(r for _, r, _ in dets)
    # The router carried the camera stream to the GPU host only: ~7 MB/s there, the
    # detections' few hundred bytes per frame (+ Zenoh's keep-alives) to the operator.
    assert rx["gpu"] > 1_000_000, rx
    assert rx["op"] < rx["gpu"] / 20, rx
    assert st["role"] == "bridge" and st["state"] == "", st   # the router bridges no stream of its own


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _make_ca(d, ca: str):
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-subj", f"/CN={ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.crt", cwd=d)


def _make_cert(d, ca: str, who: str):
    """A certificate for `who`, valid for 127.0.0.1 and localhost, signed by `ca`; a PKCS#8
    key (what Zenoh's TLS link reads)."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={who}",
             "-keyout", f"{who}.key", "-out", f"{who}.csr", cwd=d)
    (d / f"{who}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-extfile", f"{who}.ext", "-out", f"{who}.crt", cwd=d)


def _tls_config(d, who: str, ca: str) -> str:
    path = d / f"{who}.json5"
    path.write_text(f"""{{
  transport: {{ link: {{ tls: {{
    root_ca_certificate: "{d / (ca + '.crt')}",
    listen_private_key: "{d / (who + '.key')}",
    listen_certificate: "{d / (who + '.crt')}",
    connect_private_key: "{d / (who + '.key')}",
    connect_certificate: "{d / (who + '.crt')}",
    enable_mtls: true,
  }} }} }},
}}
""")
    return str(path)


def test_mutual_tls_between_bridges_and_a_refused_stranger(spawn, bridges, name, tmp_path):  # noqa: F811
    """docs/bridge.md's TLS example: two bridges with certificates from one CA exchange a
    stream over tls/ (bit-exact); a third bridge whose certificate comes from another CA
    cannot join the listener: no session, no stream."""
    d = tmp_path / "tls"
    d.mkdir()
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_cert(d, "ca", "cam")
    _make_cert(d, "ca", "gpu")
    _make_cert(d, "other-ca", "stranger")
    port = free_port()
    prod = producer(spawn, name, shape=SHAPE, fps=30, ns="a")
    a = bridges("a", "--listen", f"tls/127.0.0.1:{port}", "--export", name, "--frames", name,
                "--zenoh-config", _tls_config(d, "cam", "ca"), env_extra={"RUST_LOG": "warn"})
    b = bridges("b", "--connect", f"tls/127.0.0.1:{port}", "--import", name, "--frames", name,
                "--zenoh-config", _tls_config(d, "gpu", "ca"))
    b.expect(f"{name}: frames arriving", timeout=60)
    # trusts the right CA, but its own certificate is from another: mTLS refuses it
    c_started = time.monotonic()
    c = bridges("c", "--connect", f"tls/127.0.0.1:{port}", "--import", name, "--frames", name + ".x",
                "--zenoh-config", _tls_config(d, "stranger", "ca"), label="stranger")
    got = []
    with frameshm.Reader(name, namespace="b") as r:
        while len(got) < 30:
            f = r.wait_next(10.0)
            got.append((f.seq, frame_seq_ok(f.array)))
    assert all(s == ok for s, ok in got), "frames cross TLS bit-exact"
    # The stranger has had as long as the 30 frames took (and at least 3 s) to be let in.
    time.sleep(max(0.0, 3.0 - (time.monotonic() - c_started)))
    st = status("c", name + ".x")
    assert st["peers"] == 0 and st["streams"][name]["frames"] == 0, st
    assert st["streams"][name]["state"] == "waiting", st
    assert status("a", name)["peers"] == 1, "the listener has the trusted peer only"
    assert "UnknownIssuer" in a.text(), "Zenoh says why (RUST_LOG=warn): " + a.text()[-2000:]
    for x in (c, b, a):
        x.stop()
    prod.stop()
