"""Write a synthetic text corpus of a given size for data-pipeline benchmarks (not a test).

    python3 experiments/scripts/make_corpus.py OUT_DIR SIZE_MB [--file-mb 1]

Files of about `--file-mb` MB are made of lines drawn (seeded) from the running interpreter's
standard library, so the text looks like the default corpus and a tokenizer trains on it.
"""

from __future__ import annotations

import argparse
import random
import sysconfig
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("size_mb", type=float)
    p.add_argument("--file-mb", type=float, default=1.0)
    args = p.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = []
    for f in sorted(stdlib.glob("*.py")):
        try:
            lines += f.read_text(encoding="utf-8").splitlines(keepends=True)
        except UnicodeDecodeError:
            continue
    rng = random.Random(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target, per_file = int(args.size_mb * 1e6), int(args.file_mb * 1e6)
    written, i = 0, 0
    while written < target:
        start = rng.randrange(len(lines))
        chunk, n = [], 0
        while n < per_file:
            run = lines[start:start + rng.randrange(20, 200)]
            chunk += run
            n += sum(len(x) for x in run)
            start = rng.randrange(len(lines))
        data = "".join(chunk).encode("utf-8")
        (out / f"part_{i:05d}.txt").write_bytes(data)
        written += len(data)
        i += 1
    print(f"wrote {i} files, {written / 1e6:.1f} MB to {out}")


if __name__ == "__main__":
    main()
