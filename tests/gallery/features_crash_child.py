"""Child process for the feature-store SIGKILL test: puts deterministic features forever.

After each durable ``put`` it prints how many puts have returned.
"""

from __future__ import annotations

import sys

import numpy as np

from gallery.features import FeatureStore

ENCODER, SCHEME = "test@1", "test:orig,test:flip"
SHAPE, DIM, BATCH = (32, 4, 4), 16, 16


def features(gallery_id: int, generation: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per view (1, C, h, w) maps and (1, D) embeddings, a function of id and generation."""
    rng = np.random.default_rng(gallery_id * 1000 + generation)
    return ([rng.normal(size=(1, *SHAPE)).astype(np.float32) for _ in range(2)],
            [rng.normal(size=(1, DIM)).astype(np.float32) for _ in range(2)])


def batch(ids: list[int], generation: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    parts = [features(g, generation) for g in ids]
    return ([np.concatenate([p[0][v] for p in parts]) for v in range(2)],
            [np.concatenate([p[1][v] for p in parts]) for v in range(2)])


def main(path: str, records: int) -> None:
    store = FeatureStore.open(path, ENCODER, SCHEME)
    done = 0
    while True:
        start = (done * BATCH) % records
        ids = [1 + (start + i) % records for i in range(BATCH)]
        maps, embs = batch(ids, done)
        store.put(ids, maps, embs)
        done += 1
        print(done, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
