"""What the harness's fake camera (fakecam_pw.c) puts in its frames, computed independently,
and libv4lconvert's YUYV -> RGB24 arithmetic, so that a captured frame - raw or converted -
can be checked byte for byte against the camera's frame counter.

    n, ts_us = decode(frame, "RGB3")               # counter and capture time from the barcodes
    check_frame(frame, "RGB3", native="YUYV")      # raises AssertionError on any mismatch
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

BARCODE_X0 = 8          # first pixel of bit 0
BARCODE_PX = 8          # pixels per bit
COUNTER_ROWS = (8, 16)  # rows 8..15: frame counter
TIME_ROWS = (16, 24)    # rows 16..23: capture time, CLOCK_MONOTONIC microseconds mod 2^32

_BPP = {"YUYV": 2, "UYVY": 2, "RGB3": 3, "BGR3": 3, "GREY": 1}


def _geometry(fmt: str, w: int, h: int) -> Tuple[int, int]:
    """(row stride, rows) of the camera's buffer, as fakecam_pw.c lays it out."""
    if fmt in _BPP:
        return w * _BPP[fmt], h
    return w, h * 3 // 2   # NV12 / I420: luma rows then chroma rows of w bytes


def expected_raw(fmt: str, w: int, h: int, n: int, ts_us: int) -> np.ndarray:
    """The camera's buffer for frame n captured at ts_us: (rows, stride) uint8."""
    stride, rows = _geometry(fmt, w, h)
    x = np.arange(stride, dtype=np.int64)
    y = np.arange(rows, dtype=np.int64)
    raw = ((x[None, :] + y[:, None] + 4 * n) & 0xFF).astype(np.uint8)
    for (y0, y1), value in ((COUNTER_ROWS, n & 0xFFFFFFFF), (TIME_ROWS, ts_us & 0xFFFFFFFF)):
        for px in range(BARCODE_X0, BARCODE_X0 + 32 * BARCODE_PX):
            luma = 235 if (value >> ((px - BARCODE_X0) // BARCODE_PX)) & 1 else 16
            if fmt == "YUYV":
                raw[y0:y1, 2 * px] = luma
                raw[y0:y1, 2 * px + 1] = 128
            elif fmt == "UYVY":
                raw[y0:y1, 2 * px + 1] = luma
                raw[y0:y1, 2 * px] = 128
            elif fmt in ("RGB3", "BGR3"):
                raw[y0:y1, 3 * px:3 * px + 3] = luma
            else:
                raw[y0:y1, px] = luma
    raw.reshape(-1)[:4] = np.frombuffer((n & 0xFFFFFFFF).to_bytes(4, "little"), np.uint8)
    return raw


def yuyv_to_rgb24(raw: np.ndarray, w: int, h: int) -> np.ndarray:
    """libv4lconvert's v4lconvert_yuyv_to_rgb24 (integer arithmetic, clipped)."""
    px = raw.reshape(h, w // 2, 4).astype(np.int32)
    y0, u, y1, v = px[..., 0], px[..., 1] - 128, px[..., 2], px[..., 3] - 128
    u1 = ((u << 7) + u) >> 6
    rg = ((u << 1) + u + (v << 2) + (v << 1)) >> 3
    v1 = ((v << 1) + v) >> 1
    out = np.empty((h, w // 2, 2, 3), np.int32)
    for k, yy in enumerate((y0, y1)):
        out[:, :, k, 0] = yy + v1
        out[:, :, k, 1] = yy - rg
        out[:, :, k, 2] = yy + u1
    return np.clip(out, 0, 255).astype(np.uint8).reshape(h, w, 3)


def _luma_bits(luma_row: np.ndarray) -> int:
    value = 0
    for bit in range(32):
        sample = luma_row[BARCODE_X0 + bit * BARCODE_PX + BARCODE_PX // 2]
        if sample > 128:
            value |= 1 << bit
    return value


def luma(frame: np.ndarray, fmt: str) -> np.ndarray:
    """A luma image (h, w) of a delivered frame."""
    a = np.asarray(frame)
    if fmt in ("YUYV",):
        return a[..., 0] if a.ndim == 3 else a.reshape(a.shape[0], -1, 2)[..., 0]
    if fmt == "UYVY":
        return a[..., 1]
    if fmt in ("RGB3", "BGR3"):
        return a.astype(np.uint16).sum(axis=2) // 3
    return a  # GREY (and the luma rows of 4:2:0)


def decode(frame: np.ndarray, fmt: str) -> Tuple[int, int]:
    """(frame counter, capture time in us mod 2^32) from the barcodes."""
    y = luma(frame, fmt)
    return (_luma_bits(y[(COUNTER_ROWS[0] + COUNTER_ROWS[1]) // 2]),
            _luma_bits(y[(TIME_ROWS[0] + TIME_ROWS[1]) // 2]))


def expected(fmt: str, native: str, w: int, h: int, n: int, ts_us: int) -> np.ndarray:
    """The frame as delivered in `fmt` from a camera sending `native`."""
    raw = expected_raw(native, w, h, n, ts_us)
    if fmt == native:
        ch = _BPP.get(fmt, 1)
        return raw.reshape(h, w, ch) if ch > 1 else raw[:h]
    if native == "YUYV" and fmt in ("RGB3", "BGR3"):
        rgb = yuyv_to_rgb24(raw, w, h)
        return rgb if fmt == "RGB3" else rgb[..., ::-1]
    if fmt == "GREY" and native in ("YUYV", "UYVY"):
        return raw.reshape(h, w, 2)[..., 0 if native == "YUYV" else 1]
    raise NotImplementedError(f"{native} -> {fmt}")


# PipeWire 0.3.65's V4L2 emulation keeps cycling the camera node through every buffer,
# including the ones a V4L2 application has dequeued and not yet queued back (measured: a
# held 640x480 YUYV buffer shows the frame 4 later with 4 buffers, 16 later with 16). A
# frame is therefore only stable for a few frame periods after VIDIOC_DQBUF, and a process
# starved of CPU for that long reads (or converts) a buffer the node is rewriting. A real
# driver never does this. Tests over the emulation set EMULATION_OVERWRITES = True: a frame
# whose differing bytes are all the pattern of other frames (what an overwrite leaves) is
# then accepted and counted in OVERWRITTEN; anything else still fails.
EMULATION_OVERWRITES = False


def rewritten_after_dequeue(ts_us: int, timestamp_ns: int, slack_us: int = 1000) -> bool:
    """True when the camera captured the frame a buffer holds (its time barcode, us mod
    2^32) more than slack_us after the buffer was dequeued (the frame's timestamp, taken at
    VIDIOC_DQBUF): the emulation wrote that frame into the buffer after handing it out (see
    above). The same frame then usually comes once more, from the buffer it was meant for;
    no real driver can deliver a frame before capturing it."""
    late = (ts_us - timestamp_ns // 1000 + (1 << 31)) % (1 << 32) - (1 << 31)
    return late > slack_us


def check_delivered(frame, fmt: str, native: str, timestamp_ns: int, tolerance: int = 0) -> list:
    """check_frame for a frame delivered at timestamp_ns: [counter, capture time us,
    rewritten]. rewritten: the emulation wrote into the buffer after handing it out, either
    part of it (an overwrite check_frame accepted: its barcodes may then read as any
    counter or time) or all of it (rewritten_after_dequeue)."""
    before = len(OVERWRITTEN)
    n, ts_us = check_frame(frame, fmt, native, tolerance)
    return [n, ts_us, len(OVERWRITTEN) > before or rewritten_after_dequeue(ts_us, timestamp_ns)]


def distinct_unless_rewritten(entries) -> list:
    """entries: [counter, rewritten] per delivered frame (check_delivered). The
    counters of the frames not rewritten after their dequeue must all differ (a frame
    delivered twice by frameshm fails here); returns them. At most half may be rewritten
    copies, so a capture that only ever reads overwritten buffers still fails."""
    kept = [n for n, rewritten in entries if not rewritten]
    assert len(kept) >= (len(entries) + 1) // 2, f"most frames were rewritten after their dequeue: {entries}"
    assert len(set(kept)) == len(kept), f"a frame was delivered twice: {entries}"
    return kept
OVERWRITTEN: list = []
_BOUNDARY_BYTES = 6   # a YUYV macropixel at an overwrite boundary converts from both frames
_BOUNDARY_ROWS = 4


def _overwrite_explains(a: np.ndarray, fmt: str, native: str, n: int, bad: np.ndarray,
                        tolerance: int) -> bool:
    """True when, in every row, the bytes that differ from frame n are all the pattern of
    ONE other frame (an overwrite replaces whole runs of rows with another frame), apart
    from the few bytes where an overwrite started. The barcode rows are left out: the
    other frame's counter and capture time are unknown. The gradient repeats every 64
    frames, so n+1..n+63 stand for earlier frames too."""
    h, w = a.shape[0], a.shape[1]
    rows = a.reshape(h, -1).astype(np.int16)
    bad = bad.reshape(h, -1).copy()
    bad[COUNTER_ROWS[0]:TIME_ROWS[1]] = False
    todo = np.flatnonzero(bad.any(axis=1))
    if todo.size == 0:
        return True
    best = np.full(todo.size, np.iinfo(np.int64).max)
    for k in range(1, 64):
        other = expected(fmt, native, w, h, n + k, 0).reshape(h, -1)[todo].astype(np.int16)
        miss = ((np.abs(rows[todo] - other) > tolerance) & bad[todo]).sum(axis=1)
        best = np.minimum(best, miss)
    return bool((best <= _BOUNDARY_BYTES).all() and (best > 0).sum() <= _BOUNDARY_ROWS)


def check_frame(frame, fmt: str, native: str, tolerance: int = 0) -> Tuple[int, int]:
    """Checks a delivered frame against the camera's pattern; returns (counter, ts_us)."""
    # One snapshot: a zero-copy view of a buffer the emulation rewrites (see below) could
    # change between two reads of it (the pattern check, then the raw counter).
    a = np.array(frame, copy=True)
    n, ts_us = decode(a, fmt)
    h, w = a.shape[0], a.shape[1]
    want = expected(fmt, native, w, h, n, ts_us)
    if a.shape != want.shape:
        raise AssertionError(f"frame shape {a.shape}, expected {want.shape}")
    diff = np.abs(a.astype(np.int16) - want.astype(np.int16))
    bad_mask = diff > tolerance
    bad = int(bad_mask.sum())
    if bad and EMULATION_OVERWRITES:
        # The overwrite may have crossed the barcode itself: its middle row (what decode()
        # reads) then mixes two counters. Every counter row carries the whole counter, so
        # the rows above and below the boundary name the frames involved; the oldest one
        # whose pattern the rest of the frame is (apart from what an overwrite leaves) wins.
        y = luma(a, fmt)
        candidates = sorted({n} | {_luma_bits(y[r]) for r in range(*COUNTER_ROWS)},
                            key=lambda c: ((c - n) & 0xFFFFFFFF) - (1 << 32) * ((c - n) & 0x80000000 != 0))
        for c in candidates:
            mask = bad_mask if c == n else (
                np.abs(a.astype(np.int16) - expected(fmt, native, w, h, c, ts_us).astype(np.int16)) > tolerance)
            if _overwrite_explains(a, fmt, native, c, mask, tolerance):
                OVERWRITTEN.append((c, bad))
                return c, ts_us
    if bad:
        yx = np.argwhere(bad_mask)[0]
        raise AssertionError(
            f"frame {n} ({fmt} from {native}): {bad} bytes differ from the camera's pattern, "
            f"first at {tuple(int(v) for v in yx)}: {a[tuple(yx)]} != {want[tuple(yx)]}")
    if native in ("YUYV", "UYVY", "GREY", "RGB3", "BGR3") and fmt == native:
        raw_n = int.from_bytes(a.reshape(-1)[:4].tobytes(), "little")
        if raw_n != n:
            raise AssertionError(f"raw counter {raw_n} != barcode counter {n}")
    return n, ts_us
