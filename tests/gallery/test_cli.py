"""The ``phenolens gallery ...`` and ``phenolens match`` commands, run as the real executable."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gallery import Gallery
from tests.gallery.test_imports import gm_encoding_rows, write_gm_fixtures

REPO = Path(__file__).resolve().parents[2]
PHENOLENS = REPO / ".venv" / "bin" / "phenolens"


def phenolens(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    exe = [str(PHENOLENS)] if PHENOLENS.exists() else [sys.executable, "-m", "server.cli"]
    result = subprocess.run([*exe, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"phenolens {' '.join(args)} -> {result.returncode}\n{result.stderr}")
    return result


def test_cli_imports_gm_encodings_then_stats_list_delete_export(tmp_path):
    import pickle

    _, tsv, meta = write_gm_fixtures(tmp_path / "gm")
    enc = tmp_path / "encodings.pkl"
    rows = gm_encoding_rows()
    enc.write_bytes(pickle.dumps(rows))
    db = str(tmp_path / "g.db")
    out = json.loads(phenolens("gallery", "import", str(enc), "--gallery", db, "--gm-metadata",
                               str(meta), "--gm-syndromes", str(tsv), "--json").stdout)
    assert out["format"] == "gm-encodings" and out["added"] == 4
    stats = json.loads(phenolens("gallery", "stats", "--gallery", db, "--json").stdout)
    assert stats["records"] == 4 and stats["per_syndrome"] == {"12": 2, "40": 2}
    assert stats["syndrome_names"]["40"] == "Kabuki syndrome"
    text = phenolens("gallery", "stats", "--gallery", db).stdout
    assert "Kabuki syndrome" in text and "max/min 1.00" in text
    listed = [json.loads(line) for line in phenolens("gallery", "list", "--gallery", db, "--json",
                                                     "--limit", "2", "--offset", "1").stdout.splitlines()]
    assert [r["image_id"] for r in listed] == ["102", "103"]
    assert phenolens("gallery", "delete", "101", "--gallery", db).stdout.strip() == "deleted 1"
    missing = phenolens("gallery", "delete", "nope", "--gallery", db, check=False)
    assert missing.returncode == 2 and "not in the gallery" in missing.stderr
    export = tmp_path / "g.tar"
    phenolens("gallery", "export", str(export), "--gallery", db)
    copy = str(tmp_path / "copy.db")
    again = json.loads(phenolens("gallery", "import", str(export), "--gallery", copy, "--json").stdout)
    assert again["format"] == "export" and again["added"] == 3
    dup = phenolens("gallery", "import", str(enc), "--gallery", db, "--gm-metadata", str(meta), "--json")
    assert json.loads(dup.stdout)["added"] == 1  # only the deleted one comes back


def test_cli_reports_a_missing_gallery(tmp_path):
    result = phenolens("gallery", "stats", "--gallery", str(tmp_path / "none.db"), check=False)
    assert result.returncode == 2 and "no gallery" in result.stderr


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory):
    """The real photos in a <person>/<images> tree (person labels stand in for syndromes)."""
    pytest.importorskip("encoder.views", reason="encoder.views (the view ensemble) not built yet")
    from encoder.assets import PHOTOS

    root = tmp_path_factory.mktemp("photos")
    for p in PHOTOS:
        if p.faces == 1 and not p.aligned:
            (root / p.person).mkdir(exist_ok=True)
            shutil.copy(p.path, root / p.person / p.name)
    return root


def cli_json(capsys, *args: str) -> dict:
    """Run ``phenolens ARGS --json`` in this process (models load once) and parse its output."""
    from server.cli import main

    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_builds_a_gallery_from_real_photos_and_matches(tmp_path, photo_tree, photo_paths, capsys):
    db = str(tmp_path / "g.db")
    report = json.loads(phenolens("gallery", "import", str(photo_tree), "--gallery", db, "--json").stdout)
    assert report["added"] == 8 and report["failed"] == []
    again = cli_json(capsys, "gallery", "import", str(photo_tree), "--gallery", db)
    assert (again["added"], again["unchanged"]) == (0, 8)
    with Gallery.open(db) as g:
        assert g.encoder_id.startswith("sface") and g.view_scheme.startswith("sface:orig")
        assert g.get_image("person_a/person_a_1.jpg").crop_png.startswith(b"\x89PNG")

    query = str(photo_paths["person_a_2.jpg"])
    doc = cli_json(capsys, "match", query, "--gallery", db, "--top", "3",
                   "--exclude-subject", "person_a/person_a_2.jpg")
    assert doc["hits"][0]["syndrome_id"] == "person_a", "same person years apart should match first"
    assert doc["hits"][0]["image_id"] == "person_a/person_a_1.jpg"
    assert doc["syndromes"][0]["syndrome_id"] == "person_a"
    assert len(doc["hits"]) == 3 and doc["query"]["face_count"] == 1
    only = cli_json(capsys, "match", query, "--gallery", db, "--syndromes", "impostor_1", "impostor_2")
    assert {h["syndrome_id"] for h in only["hits"]} == {"impostor_1", "impostor_2"}

    added = cli_json(capsys, "gallery", "add", str(photo_paths["person_b_2.jpg"]), "--gallery", db,
                     "--image-id", "extra", "--subject", "pb", "--syndrome-id", "person_b")
    assert added["image_id"] == "extra"
    from server.cli import main

    assert main(["match", query, "--gallery", db, "--no-flip"]) != 0
    assert "holds" in capsys.readouterr().err
