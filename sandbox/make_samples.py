"""
Generate the large sample files of the demo sandbox, if they are missing.

They are deterministic (a seeded generator) so every machine shares the same
bytes, and they are written one MiB at a time so memory stays flat.  They are
not committed (see .gitignore); the small hand-made samples are.
"""

import os
import random
import sys
from pathlib import Path

SANDBOX = Path(__file__).resolve().parent
MIB = 1024 * 1024

# path relative to the sandbox -> (size in MiB, seed)
LARGE_SAMPLES = {
    "peer2/shared/random-32MiB.bin": (32, 2),
    "peer3/shared/random-8MiB.bin": (8, 3),
}


def make_sample(path: Path, mebibytes: int, seed: int) -> bool:
    """
    Write C{mebibytes} MiB of seeded pseudo-random bytes to C{path}.

    @return: C{False} if a file of the right size is already there.
    """
    if path.is_file() and path.stat().st_size == mebibytes * MIB:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = random.Random(seed)
    # Write beside the target and rename, so an interrupted run never leaves a
    # short file that looks finished.
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        for _ in range(mebibytes):
            f.write(generator.randbytes(MIB))
    os.replace(partial, path)
    return True


def main() -> int:
    for relative, (mebibytes, seed) in LARGE_SAMPLES.items():
        path = SANDBOX / relative
        made = make_sample(path, mebibytes, seed)
        print(f"{'created' if made else 'exists '} sandbox/{relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
