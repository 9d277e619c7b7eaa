"""GestaltMatcher's matching accuracy (macro top-k on subject-disjoint splits) as a protocol.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gallery import accuracy as A

# ----------------------------------------------------------- matching accuracy


def accuracy(
    query_embeddings: np.ndarray,
    query_split: A.Split,
    gallery_embeddings: np.ndarray,
    gallery_split: A.Split,
    ks: Sequence[int] = A.TOP_KS,
) -> A.TopKAccuracy:
    """GestaltMatcher's protocol (subject-disjoint, macro top-k); see ``gallery.accuracy.split_accuracy``."""
    return A.split_accuracy(query_embeddings, query_split, gallery_embeddings, gallery_split, ks)
