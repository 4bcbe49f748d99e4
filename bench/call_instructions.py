"""Instructions per message of the Python API's per-message path, counted by callgrind:
a repeatable figure on a noisy VM, where python_calls.py's times move 2x between runs.

Each case runs in its own process under `valgrind --tool=callgrind` twice, with LOW and
HIGH iterations after a warm-up; (instructions(HIGH) - instructions(LOW)) / (HIGH - LOW)
is the cost of one iteration, start-up and teardown cancelled out. Every case includes the
producer's loan + pack_into + commit of a 64 B message (the "loan+commit" case alone), on
a queueless process-all Reader in the same process, so nothing waits. OpenBLAS is held to
one thread: its idle threads spin a varying number of instructions.

    python bench/call_instructions.py                 # needs valgrind (Debian: valgrind)
    python bench/call_instructions.py --cases loan+commit,unpack_from(frame)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402

CASES = {
    "loan+commit": "lc()",
    "wait_next": "lc(); wn(1.0)",
    "wait_next+.array": "lc(); wn(1.0).array",
    "unpack_from(.array)": "lc(); unpack_from(wn(1.0).array, 0)",
    "unpack_from(frame)": "lc(); unpack_from(wn(1.0), 0)",
    "unpack_from(frame)+valid()": "lc(); f = wn(1.0); unpack_from(f, 0); f.valid()",
}

WORKER = """
import struct, sys
import numpy as np, frameshm
w = frameshm.Writer("instr64", shape=(64,), dtype=np.uint8, nslots=1024)
r = frameshm.Reader("instr64", queue=False, spin=False)
P = struct.Struct("<qqqq")
pack_into, unpack_from, loan, commit, wn = P.pack_into, P.unpack_from, w.loan, w.commit, r.wait_next
def lc():
    pack_into(loan(), 0, 1, 2, 3, 4)
    commit()
def step():
    {body}
for _ in range(200):
    step()
for _ in range(int(sys.argv[1])):
    step()
r.close()
w.close()
"""


def count(body: str, n: int, env: dict) -> int:
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, "-c", WORKER.format(body=body), str(n)],
                         env=env, capture_output=True, text=True, timeout=900, check=True)
    m = re.search(r"Collected : (\d+)", out.stderr)
    if not m:
        raise RuntimeError(out.stderr[-2000:])
    return int(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    ap.add_argument("--low", type=int, default=1000)
    ap.add_argument("--high", type=int, default=11000)
    args = ap.parse_args()
    if not shutil.which("valgrind"):
        print("valgrind not found (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s): {', '.join(unknown)}")
    shm_dir = _common.private_shm_dir("instr")
    env = dict(os.environ, FRAMESHM_DIR=shm_dir, OPENBLAS_NUM_THREADS="1")
    try:
        print(f"instructions per iteration (callgrind, ({args.high} - {args.low}) iterations)")
        for name in names:
            lo, hi = count(CASES[name], args.low, env), count(CASES[name], args.high, env)
            print(f"{name:24s} {(hi - lo) / (args.high - args.low):8.0f}")
    finally:
        _common.cleanup_shm_dir(shm_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
