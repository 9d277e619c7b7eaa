"""``phenolens explain --pairs``: many photo pairs in one process, one JSON line per pair."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from encoder.assets import photo


def test_cli_explains_every_pair_of_a_csv_in_one_process(tmp_path):
    rows = [("person_a_1.jpg", "person_a_2.jpg"), ("person_a_1.jpg", "impostor_1.jpg")]
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("query,gallery\n" + "".join(
        f"{photo(q)},{photo(g)}\n" for q, g in rows))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "explain", "--pairs", str(csv_path),
         "--no-flip", "--encoder", "sface", "--out", str(out), "--json",
         "--methods", "similarity", "saliency"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [(d["query"], d["gallery"]) for d in docs] == [
        (str(photo(q)), str(photo(g))) for q, g in rows]
    same, impostor = docs
    assert same["cosine"] > impostor["cosine"]
    for number, doc in enumerate(docs, start=1):
        assert abs(doc["residual"]) <= 1e-4
        q = np.load(out / f"pair{number:03d}_similarity_query.npy")
        assert abs(doc["cosine"] - float(q.sum()) - doc["bias_share"] - doc["residual"]) <= 1e-5
        assert doc["methods"]["saliency"]["forward_passes"] >= 1  # the family, per pair
        for name in ("pair", "query_photo", "gallery"):
            assert (out / f"pair{number:03d}_saliency_{name}.png").stat().st_size > 0


def test_pairs_csv_without_the_columns_is_refused(tmp_path):
    bad = tmp_path / "pairs.csv"
    bad.write_text("a,b\nx.jpg,y.jpg\n")
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "explain", "--pairs", str(bad), "--out",
         str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0 and "query,gallery" in proc.stderr
