"""``phenolens explain IMAGE --gallery PATH``: the server's Explain use case run locally."""

from __future__ import annotations

import json

import numpy as np
import pytest

TOP = 2


def test_cli_explain_of_a_gallery_ranks_like_the_server_and_encodes_the_query_once(
        client, query_path, report_backend, report_dir, capsys, monkeypatch):
    import encoder.views as views
    from explain.attribution.engine import Explainer
    from server.cli import main

    served = client.explain(query_path, top_k=TOP, methods=["similarity"], photo_maps=False)
    encoded: list[int] = []  # crops per encode
    encode = Explainer.encode

    def counting_encode(self, crops, *args, **kwargs):
        encoded.append(1 if np.ndim(crops) == 3 else len(crops))
        return encode(self, crops, *args, **kwargs)

    def embed_views(self, crops):
        pytest.fail("the query was embedded apart from the features its maps are drawn from")

    monkeypatch.setattr(Explainer, "encode", counting_encode)
    monkeypatch.setattr(views.Ensemble, "embed_views", embed_views)
    assert main(["explain", str(query_path), "--gallery", str(report_backend.gallery.path),
                 "--top", str(TOP), "--methods", "similarity", "--effects", "0", "--json",
                 "--out", str(report_dir / "cli-explain")]) == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sum(encoded) == 1 + TOP, encoded  # the query once, each hit once
    assert [d["rank"] for d in docs] == list(range(1, TOP + 1))
    assert [str(d["gallery_id"]) for d in docs] == [
        e.hit.gallery_id for e in served.explanations]
    for doc, e in zip(docs, served.explanations, strict=True):
        assert doc["gallery_score"] == pytest.approx(e.hit.cosine, abs=1e-6)
        assert doc["confidence"] == pytest.approx(e.hit.confidence.to_json())
        assert set(doc["methods"]["similarity"]["regions"]) == {"query", "gallery"}
