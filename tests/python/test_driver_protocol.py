"""The driver's control-plane codec (frameshm/driver/protocol.py, docs/driver-protocol.md):
byte layouts, round trips, and a decoder that rejects (never crashes on) anything else.
"""

from __future__ import annotations

import struct

import pytest

from frameshm.driver import protocol as P

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

POOLS = [
    P.PoolInfo(1, 16, 1 << 20, "shm:file?path=/dev/shm/tensorpool-u/default/1001/3/1.pool"),
    P.PoolInfo(2, 16, 4 << 20, "shm:file?path=/dev/shm/tensorpool-u/default/1001/3/2.pool"),
]
HDR_URI = "shm:file?path=/dev/shm/tensorpool-u/default/1001/3/header.ring"

SAMPLES = [
    P.AttachRequest(-5, 1001, 77, 1, 0, 8, 2, 0),
    P.AttachRequest(2**62, 2**32 - 1, 1, 2, 1, 0, 255, 255),
    P.AttachResponse(9, 0, 3, 123456789, 1001, 3, 1, 16, 256, 8, POOLS, HDR_URI, ""),
    P.AttachResponse(9, 3, error_message="stream 1001 already has producer client 77 (pid 1)"),
    P.DetachRequest(11, 3, 1001, 77, 1),
    P.DetachResponse(11, 0),
    P.DetachResponse(12, 3, "unknown lease 99"),
    P.LeaseKeepalive(3, 1001, 77, 1, 555),
    P.DriverShutdown(1000, 0, "driver shutting down (SIGTERM)"),
    P.LeaseRevoked(1000, 3, 1001, 77, 1, 2, "no keepalive for 300 ms"),
    P.PoolAnnounce(1001, 77, 3, 1000, 1, 16, 256, POOLS, HDR_URI),
    P.ConsumerRegister(13, 3, 1001, 77, P.CONSUMER_FLAG_NO_QUEUE, 30, "viewer", ""),
    P.ConsumerRegister(14, 3, 1001, 77, 0, 0, "viewer", "/fshm-1f-2a-3"),
    P.SetControl(15, 3, 1001, 0, 255),
    P.ControlResponse(13, 0, 5),
    P.ControlResponse(15, 3, 0, "uid 65534 may not set stream 1001's control bytes"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    data = P.encode(msg)
    assert len(data) <= P.MAX_MESSAGE
    assert P.decode(data) == msg


def test_byte_layouts():
    """Offsets as docs/driver-protocol.md §3 lists them."""
    a = P.encode(P.AttachRequest(0x0102030405060708, 1001, 77, 1, 1, 8, 2, 255))
    assert len(a) == 8 + 24
    assert struct.unpack_from("<HHHH", a) == (24, 1, 901, 1)
    assert struct.unpack_from("<q", a, 8)[0] == 0x0102030405060708
    assert struct.unpack_from("<I", a, 8 + 8)[0] == 1001
    assert struct.unpack_from("<I", a, 8 + 12)[0] == 77
    assert a[8 + 16] == 1
    assert struct.unpack_from("<I", a, 8 + 17)[0] == 1
    assert (a[8 + 21], a[8 + 22], a[8 + 23]) == (8, 2, 255)

    r = P.encode(P.AttachResponse(5, 0, 3, 99, 1001, 7, 1, 16, 256, 8, POOLS[:1], "shm:file?path=/h", ""))
    assert struct.unpack_from("<HHHH", r) == (51, 2, 901, 1)
    b = 8
    assert struct.unpack_from("<qiQQIQIIHB", r, b) == (5, 0, 3, 99, 1001, 7, 1, 16, 256, 8)
    g = b + 51
    assert struct.unpack_from("<HH", r, g) == (10, 1)
    assert struct.unpack_from("<HII", r, g + 4) == (1, 16, 1 << 20)
    n = struct.unpack_from("<I", r, g + 14)[0]
    assert r[g + 18:g + 18 + n].decode() == POOLS[0].uri
    h = g + 18 + n
    assert struct.unpack_from("<I", r, h)[0] == len("shm:file?path=/h")
    e = h + 4 + len("shm:file?path=/h")
    assert struct.unpack_from("<I", r, e)[0] == 0 and len(r) == e + 4

    refused = P.encode(P.AttachResponse(5, 3, error_message="no"))
    assert struct.unpack_from("<qiQQIQIIHB", refused, 8)[2:] == (
        2**64 - 1, 2**64 - 1, 2**32 - 1, 2**64 - 1, 2**32 - 1, 2**32 - 1, 2**16 - 1, 255)
    assert struct.unpack_from("<HH", refused, 8 + 51) == (10, 0)

    assert struct.unpack_from("<HHHH", P.encode(P.DetachRequest(1, 2, 3, 4, 2))) == (25, 3, 901, 1)
    assert struct.unpack_from("<HHHH", P.encode(P.DetachResponse(1, 0))) == (12, 4, 901, 1)
    k = P.encode(P.LeaseKeepalive(2, 1001, 77, 1, 12345))
    assert struct.unpack_from("<HHHH", k) == (25, 5, 901, 1)
    assert struct.unpack_from("<QIIBQ", k, 8) == (2, 1001, 77, 1, 12345)
    assert struct.unpack_from("<HHHH", P.encode(P.DriverShutdown(1, 0))) == (9, 6, 901, 1)
    v = P.encode(P.LeaseRevoked(9, 2, 1001, 77, 1, 2))
    assert struct.unpack_from("<HHHH", v) == (26, 7, 901, 1)
    assert struct.unpack_from("<QQIIBB", v, 8) == (9, 2, 1001, 77, 1, 2)
    an = P.encode(P.PoolAnnounce(1001, 77, 3, 1000, 1, 16, 256, POOLS, HDR_URI))
    assert struct.unpack_from("<HHHH", an) == (35, 1, 900, 1)
    assert struct.unpack_from("<IIQQBIIH", an, 8) == (1001, 77, 3, 1000, 1, 1, 16, 256)
    # frameshm's extensions (sealed transport): template ids 101..103, as
    # lib/src/fshm_lease_requests.c encodes and decodes them.
    cr = P.encode(P.ConsumerRegister(13, 3, 1001, 77, 2, 30, "viewer", "/fshm-1f-2a-3"))
    assert struct.unpack_from("<HHHH", cr) == (32, 101, 901, 1)
    assert struct.unpack_from("<qQIIII", cr, 8) == (13, 3, 1001, 77, 2, 30)
    assert struct.unpack_from("<I", cr, 40)[0] == 6 and cr[44:50] == b"viewer"
    assert struct.unpack_from("<I", cr, 50)[0] == 13 and cr[54:] == b"/fshm-1f-2a-3"
    sc = P.encode(P.SetControl(15, 3, 1001, 7, 200))
    assert struct.unpack_from("<HHHH", sc) == (22, 102, 901, 1) and len(sc) == 30
    assert struct.unpack_from("<qQIBB", sc, 8) == (15, 3, 1001, 7, 200)
    resp = P.encode(P.ControlResponse(15, 3, -1004, "full"))
    assert struct.unpack_from("<HHHH", resp) == (16, 103, 901, 1)
    assert struct.unpack_from("<qiiI", resp, 8) == (15, 3, -1004, 4) and resp[28:] == b"full"
    # Their refusals echo the correlation id, so the client matches them to its request.
    assert P.correlation_of(cr) == 13 and P.correlation_of(sc) == 15


def test_forward_compatible_block():
    """A longer block (a later minor version's extra fields) is accepted, the extra bytes skipped."""
    base = P.encode(P.AttachRequest(7, 1001, 77, 1, 0, 8, 2, 0))
    longer = struct.pack("<HHHH", 30, 1, 901, 1) + base[8:] + b"\xee" * 6
    assert P.decode(longer) == P.decode(base)


def _expect(data, code, corr=None):
    with pytest.raises(P.DecodeError) as ei:
        P.decode(data)
    assert ei.value.code == code, ei.value.message
    assert ei.value.correlation_id == corr
    return ei.value


def test_rejections():
    good = P.encode(P.AttachRequest(42, 1001, 77, 1, 0, 8, 2, 0))
    _expect(b"", P.Code.INVALID_PARAMS)
    _expect(b"\x01\x02\x03", P.Code.INVALID_PARAMS)
    _expect(good[:-1], P.Code.INVALID_PARAMS, 42)                         # truncated block
    _expect(struct.pack("<HHHH", 20, 1, 901, 1) + good[8:28], P.Code.INVALID_PARAMS, 42)  # short blockLength
    _expect(struct.pack("<HHHH", 24, 1, 999, 1) + good[8:], P.Code.UNSUPPORTED)           # schema
    _expect(struct.pack("<HHHH", 24, 1, 901, 2) + good[8:], P.Code.UNSUPPORTED, 42)       # version
    _expect(struct.pack("<HHHH", 24, 99, 901, 1) + good[8:], P.Code.UNSUPPORTED)          # template
    _expect(good + b"x" * P.MAX_MESSAGE, P.Code.INVALID_PARAMS)
    # Group and var lengths must stay inside the packet.
    resp = bytearray(P.encode(P.AttachResponse(5, 0, 3, 99, 1001, 7, 1, 16, 256, 8, POOLS, HDR_URI, "")))
    struct.pack_into("<HH", resp, 8 + 51, 10, 60000)
    _expect(bytes(resp), P.Code.INVALID_PARAMS)
    resp = bytearray(P.encode(P.AttachResponse(5, 0, 3, 99, 1001, 7, 1, 16, 256, 8, POOLS, HDR_URI, "")))
    struct.pack_into("<I", resp, 8 + 51 + 4 + 10, 2**32 - 1)
    _expect(bytes(resp), P.Code.INVALID_PARAMS)
    resp = bytearray(P.encode(P.AttachResponse(5, 0, 3, 99, 1001, 7, 1, 16, 256, 8, POOLS, HDR_URI, "")))
    struct.pack_into("<HH", resp, 8 + 51, 4, 2)  # entries shorter than the known 10 bytes
    _expect(bytes(resp), P.Code.INVALID_PARAMS)
    # Var data is ASCII without NUL.
    rev = bytearray(P.encode(P.LeaseRevoked(1, 2, 3, 4, 1, 2, "abc")))
    rev[-2] = 0
    _expect(bytes(rev), P.Code.INVALID_PARAMS)
    rev[-2] = 0xC3
    _expect(bytes(rev), P.Code.INVALID_PARAMS)
    # Detach: the correlationId is still reported.
    det = P.encode(P.DetachRequest(77, 1, 2, 3, 1))
    _expect(det[:20], P.Code.INVALID_PARAMS, 77)


def test_encode_limits():
    with pytest.raises(ValueError):
        P.encode(P.PoolAnnounce(1, 0, 1, 1, 1, 1, 256, [P.PoolInfo(1, 1, 64, "x" * 4000)], "y" * 200))
    # Error texts are cut so a response always fits in one packet.
    data = P.encode(P.AttachResponse(1, 2, error_message="e" * 10000))
    assert len(data) <= P.MAX_MESSAGE
    assert P.decode(data).error_message.endswith("...")


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_decoder_never_crashes_on_garbage(data):
    try:
        msg = P.decode(data)
    except P.DecodeError as err:
        assert err.code in (P.Code.INVALID_PARAMS, P.Code.UNSUPPORTED)
        return
    assert P.decode(P.encode(msg)) == msg


@st.composite
def mutated(draw):
    """A valid message with a few bytes overwritten, cut short or extended."""
    data = bytearray(P.encode(draw(st.sampled_from(SAMPLES))))
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    tail = draw(st.binary(max_size=16))
    return bytes(data[:cut]) + tail


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_decoder_never_crashes_on_mutations(data):
    try:
        msg = P.decode(data)
    except P.DecodeError as err:
        assert err.code in (P.Code.INVALID_PARAMS, P.Code.UNSUPPORTED)
        assert err.message
        return
    # Whatever decodes re-encodes to something that decodes the same.
    assert P.decode(P.encode(msg)) == msg
