#!/usr/bin/env python3
"""Person detectors side by side: OpenCV's HOG (``hog``) against the SSDLite-MobileNetV2
person network on OpenVINO (``dnn``), on the same labelled images, in one run.

Images (nothing downloaded: scikit-image's bundled photographs and frameshm's test pattern):

* with a person — the astronaut and cameraman photographs; the test pattern's person
  frames (640x480 and 320x240, the person at several places); the two photographs scaled
  to 160–256 px and pasted into others (rocket, coffee, grass), some mirrored;
* without — 12 photographs without people (coffee, the cat, the rocket launch, coins,
  moon, Hubble deep field, immunohistochemistry, gravel, brick, clock, grass, the
  stereo motorcycle) and the empty test pattern.

A *hit* is a detection whose box centre lies inside the person's box (the pasted
photograph's box; set by hand for the two photographs); detections elsewhere are *false
boxes*; a person image with no hit is a *miss*. Time: median wall time of one detector
call over ``--repeat`` calls per image (after a warm-up), the two detectors interleaved
image by image so they see the same machine load; threads per detector: ``--threads``.

    python bench/detectors.py [--repeat 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header_line, machine_info, markdown_table, write_results  # noqa: E402

# Hand-set person boxes [x1, y1, x2, y2] of the two photographs with a person.
PHOTO_PERSON = {"astronaut": (0, 0, 400, 512), "camera": (0, 40, 360, 512)}
NEGATIVE_PHOTOS = ("coffee", "chelsea", "rocket", "coins", "moon", "hubble_deep_field", "immunohistochemistry",
                   "gravel", "brick", "clock", "grass", "stereo_motorcycle")


def rgb(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[:, :, :3])


def sprite(size: int) -> np.ndarray:
    from frameshm.sources.test_pattern import load_person_sprite

    return load_person_sprite(size, 3)


def scaled_cameraman(size: int) -> np.ndarray:
    from skimage import data
    from skimage.transform import resize

    img = resize(data.camera(), (size, size), anti_aliasing=True, preserve_range=True)
    return rgb(np.clip(np.rint(img), 0, 255).astype(np.uint8))


def paste(background: np.ndarray, person: np.ndarray, x0: int, y0: int):
    out = rgb(background).copy()
    s = person.shape[0]
    out[y0:y0 + s, x0:x0 + s] = person
    return out, (x0, y0, x0 + s, y0 + s)


def test_pattern_frames(width: int, height: int, n: int):
    """Person frames of the test pattern at ``n`` evenly spread positions, and the box."""
    from frameshm.sources.test_pattern import TestPatternSource

    src = TestPatternSource("", {"width": str(width), "height": str(height), "person": "on"})
    src.open()
    p = src._person_px
    out = []
    for i in range(n):
        x0 = round(i * (width - p) / max(1, n - 1))
        # render() places the person at int(t * 90 px/s) (back and forth): pick t for x0
        ts = src._anchor_ns + int(x0 / 90.0 * 1e9) + 1000
        frame = np.empty(src.shape, np.uint8)
        src.render(frame, i, ts)
        y0 = (height - p) // 2
        out.append((f"pattern {width}x{height} @x={x0}", frame, (x0, y0, x0 + p, y0 + p)))
    return out


def labelled_images():
    """[(name, image RGB uint8, person box or None)]."""
    from skimage import data

    images = [(name, rgb(getattr(data, name)()), box) for name, box in PHOTO_PERSON.items()]
    images += test_pattern_frames(640, 480, 4) + test_pattern_frames(320, 240, 3)
    for who, bg, size, x0, y0, mirror in (
        ("astronaut", "rocket", 240, 300, 150, False), ("astronaut", "coffee", 240, 40, 140, True),
        ("astronaut", "grass", 160, 200, 300, False), ("astronaut", "rocket", 160, 60, 220, True),
        ("cameraman", "grass", 256, 200, 200, False), ("cameraman", "coffee", 160, 380, 200, True),
    ):
        person = sprite(size) if who == "astronaut" else scaled_cameraman(size)
        if mirror:
            person = np.ascontiguousarray(person[:, ::-1])
        img, box = paste(getattr(data, bg)(), person, x0, y0)
        images.append((f"{who} {size}px in {bg}{' (mirrored)' if mirror else ''}", img, box))
    for name in NEGATIVE_PHOTOS:
        img = getattr(data, name)()
        if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
            img = img[0]
        images.append((name, rgb(img), None))
    from frameshm.sources.test_pattern import TestPatternSource

    src = TestPatternSource("", {"width": "640", "height": "480"})
    src.open()
    empty = np.empty(src.shape, np.uint8)
    src.render(empty, 0, src._anchor_ns)
    images.append(("pattern 640x480, nobody", empty, None))
    return images


def score(dets: np.ndarray, box):
    """(hit, false boxes) of one detector output against the person box (None: nobody)."""
    if box is None:
        return False, int(len(dets))
    cx = (dets[:, 0] + dets[:, 2]) / 2
    cy = (dets[:, 1] + dets[:, 3]) / 2
    inside = (cx >= box[0]) & (cx <= box[2]) & (cy >= box[1]) & (cy <= box[3])
    return bool(inside.any()), int((~inside).sum())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=15, help="timed calls per image and detector (median)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of each detector")
    ap.add_argument("--out", help="results JSON (default bench/results/detectors-<time>.json)")
    args = ap.parse_args()

    from frameshm.detectors import HOGPersonDetector
    from frameshm.detectors_dnn import DNNPersonDetector

    info = machine_info()
    t0 = time.perf_counter()
    detectors = {"hog": HOGPersonDetector(threads=args.threads)}
    load_s = {"hog": time.perf_counter() - t0}
    t0 = time.perf_counter()
    detectors["dnn"] = DNNPersonDetector(threads=args.threads)
    load_s["dnn"] = time.perf_counter() - t0
    try:
        import cv2
        import openvino

        info["opencv"], info["openvino"] = cv2.__version__, openvino.__version__
    except ImportError:
        pass
    print(header_line(info))
    print(f"detectors: {detectors['hog']!r}; {detectors['dnn']!r}; threads={args.threads}, repeat={args.repeat}")

    rows, per_image = [], []
    totals = {k: {"hits": 0, "misses": 0, "false_boxes": 0, "false_images": 0, "ms": []} for k in detectors}
    for name, img, box in labelled_images():
        entry = {"image": name, "shape": list(img.shape), "person_box": box}
        for key, det in detectors.items():
            det(img)  # warm-up (the DNN compiles once per frame size)
        times = {k: [] for k in detectors}
        for _ in range(args.repeat):
            for key, det in detectors.items():
                t = time.perf_counter()
                dets = det(img)
                times[key].append(time.perf_counter() - t)
        row = [name, f"{img.shape[1]}x{img.shape[0]}", "person" if box else "-"]
        for key, det in detectors.items():
            dets = det(img)
            hit, false = score(dets, box)
            ms = float(np.median(times[key]) * 1e3)
            tot = totals[key]
            tot["ms"].append(ms)
            tot["false_boxes"] += false
            if box is not None:
                tot["hits" if hit else "misses"] += 1
            elif false:
                tot["false_images"] += 1
            entry[key] = {"ms": ms, "hit": hit if box else None, "false_boxes": false,
                          "detections": np.round(dets, 1).tolist()}
            verdict = ("hit" if hit else "MISS") if box else ("ok" if not false else "FALSE")
            row += [ms, verdict + (f" +{false} false" if box and false else "")]
        rows.append(row)
        per_image.append(entry)

    headers = ["image", "size", "truth", "hog ms", "hog", "dnn ms", "dnn"]
    print(markdown_table(headers, rows))
    n_pos = sum(1 for e in per_image if e["person_box"])
    n_neg = len(per_image) - n_pos
    summary = []
    for key, tot in totals.items():
        summary.append([key, f"{tot['hits']}/{n_pos}", tot["misses"], f"{tot['false_images']}/{n_neg}",
                        tot["false_boxes"], float(np.median(tot["ms"])), float(np.max(tot["ms"])), load_s[key]])
    print()
    print(markdown_table(["detector", "hits", "misses", "images without people with a box", "false boxes",
                          "median ms/image", "max ms/image", "load s"], summary))
    out = write_results("detectors", {"machine": info, "args": vars(args), "images": per_image,
                                      "summary": {r[0]: dict(zip(("hits", "misses", "false_images", "false_boxes",
                                                                  "median_ms", "max_ms", "load_s"), r[1:]))
                                                  for r in summary}}, args.out)
    with open("/proc/loadavg") as f:
        print(f"\nloadavg at end: {' '.join(f.read().split()[:3])}; results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
