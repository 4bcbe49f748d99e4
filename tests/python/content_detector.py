"""A deterministic detector plug-in for tests (``content_detector:ContentDetector``, with
tests/python on the inference role's PYTHONPATH): its boxes are a function of the frame's
bytes only, so the same frame always gets the same detections, whichever run sees it."""

import zlib

import numpy as np


class ContentDetector:
    def __call__(self, frame):
        h = zlib.crc32(np.ascontiguousarray(frame))
        n = h % 3
        rows = [[(h >> 3) % 100, (h >> 9) % 80, 100 + (h >> 5) % 50, 90 + (h >> 11) % 30, (h % 1000) / 1000, i]
                for i in range(n)]
        return np.array(rows, np.float32).reshape(n, 6)
