"""Child process for the SIGKILL test: imports deterministic records forever, in batches.

After each committed batch it prints the number of records committed so far.
"""

from __future__ import annotations

import sys

import numpy as np

from gallery import Entry, Gallery

BATCH = 50


def record(i: int) -> Entry:
    rng = np.random.default_rng(i)
    return Entry(
        image_id=f"img{i}", subject_id=f"subj{i // 3}", syndrome_id=f"SYN{i % 9}",
        syndrome_name=f"Syndrome {i % 9}", genes=(f"G{i % 4}",),
        views=rng.normal(size=(3, 64)).astype(np.float32), crop_png=bytes(rng.integers(0, 256, 2000, np.uint8)),
    )


def main(path: str) -> None:
    gallery = Gallery.open(path)
    start = len(gallery)
    i = start
    while True:
        gallery.add_many([record(j) for j in range(i, i + BATCH)], batch_size=BATCH)
        i += BATCH
        print(i, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
