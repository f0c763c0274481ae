"""Cost of checkpoint checksums, per GiB: save a state of SIZE GiB with llmjax's Checkpointer (checksums off),
then time `integrity.write_manifest` (what the background thread does after each save) and `integrity.verify`
(what a resume adds), twice each (the second pass reads from the page cache).

    python3 benchmarks/checksum_cost.py DIR [SIZE_GIB]

A benchmark, not a test: report it with the machine's load (`uptime`).
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import jax
from etils import epath

from llmjax.train.checkpoint.manager import Checkpointer, integrity


def main() -> None:
    directory, gib = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    shutil.rmtree(directory, ignore_errors=True)
    n = int(gib * 2**30 / 4 / 8)
    state = {f"w{i}": jax.random.normal(jax.random.PRNGKey(i), (n,)) for i in range(8)}
    ckpt = Checkpointer(directory, checksums=False, async_save=False)
    t0 = time.perf_counter()
    ckpt.save(1, state, {"step": 1})
    ckpt.close()
    t_save = time.perf_counter() - t0
    step = epath.Path(os.path.join(directory, "1"))
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(step) for f in files) / 2**30
    for _ in range(2):
        t0 = time.perf_counter()
        integrity.write_manifest(step)
        t_hash = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert integrity.verify(step) is None
        t_verify = time.perf_counter() - t0
        print(f"{size:.2f} GiB: orbax save {t_save / size:.2f} s/GiB; write checksums {t_hash / size:.2f} s/GiB; "
              f"verify {t_verify / size:.2f} s/GiB ({integrity._threads()} hashing threads)")
    shutil.rmtree(directory)


if __name__ == "__main__":
    main()
