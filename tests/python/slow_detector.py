"""A detector plug-in for tests (``slow_detector:SlowOracle``, with tests/python on the
inference role's PYTHONPATH): as slow as a heavy model on a busy machine, and never wrong,
so a test of timing does not depend on a model's accuracy. It knows whether the person is
in view from the test pattern's stamp (frameshm.sources.test_pattern.read_stamp) and
answers with a fixed box around the middle of the frame."""

import time

import numpy as np

from frameshm.sources.test_pattern import read_stamp


class SlowOracle:
    def __init__(self, delay_s: float = 1.5, box=(200, 60, 440, 420)):
        self.delay_s = delay_s
        self.row = np.array([[*box, 0.9, 0]], np.float32)

    def __call__(self, frame):
        stamp = read_stamp(frame)  # before sleeping: the copy the role gave us does not change
        time.sleep(self.delay_s)
        if stamp is None:
            raise ValueError("SlowOracle needs test-pattern frames (test: source)")
        return self.row if stamp.person else np.zeros((0, 6), np.float32)
