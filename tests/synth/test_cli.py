"""``phenolens synth`` and ``phenolens train`` end to end on a few real photos."""

from __future__ import annotations

import csv
import json

from server.cli import main

PHOTOS = "Tom_Hanks_54745.png,person_a_1.jpg,impostor_1.jpg"


def test_synth_then_train_writes_a_dataset_a_gallery_and_a_loadable_checkpoint(tmp_path, capsys):
    data = tmp_path / "data"
    code = main(["synth", "--out", str(data), "--photos", PHOTOS, "--classes",
                 "wide_eyes,small_chin", "--sizes", "wide_eyes=4,small_chin=2", "--eval-size", "2",
                 "--split", "train=0.34,val=0.33,test=0.33", "--gallery", str(tmp_path / "g.db"),
                 "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["train"]["per_class"] == {"wide_eyes": 4, "small_chin": 2}
    assert summary["gallery"]["added"] == 6
    with open(data / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    subjects = {split: {r["subject"] for r in rows if r["split"] == split}
                for split in ("train", "val", "test")}
    assert not subjects["train"] & subjects["test"] and not subjects["val"] & subjects["test"]
    assert all((data / r["mask_path"]).exists() and (data / r["image_path"]).exists() for r in rows)

    ckpt = tmp_path / "head.pt"
    code = main(["train", "--data", str(data), "--out", str(ckpt), "--epochs", "2",
                 "--report", str(tmp_path / "report.json"), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert ckpt.exists() and report["classes"] == ["small_chin", "wide_eyes"]
    assert 0.0 <= report["test"]["finetuned"]["macro_top1"] <= 1.0
    assert report["encoder_version"].startswith("sface+head-")

    from gallery import Gallery

    code = main(["synth", "--out", str(tmp_path / "d2"), "--photos", "Tom_Hanks_54745.png",
                 "--classes", "wide_eyes", "--size", "2", "--split", "train=1", "--gallery",
                 str(tmp_path / "g2.db"), "--encoder", "finetuned", "--weights", str(ckpt)])
    assert code == 0
    with Gallery.open(tmp_path / "g2.db", create=False) as g:
        assert len(g) == 2 and g.encoder_id == f"finetuned@{report['encoder_version']}"
        info = next(g.iter_records()).info
        assert (info.syndrome_name, info.omim_id, info.genes) == (
            "synthetic hypertelorism", "SYN-900001", ("SYNG-ORB1",))


def test_synth_rejects_an_unknown_syndrome(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--classes", "big_ears"]) == 2
    assert "unknown synthetic syndrome" in capsys.readouterr().err


def test_train_with_the_lda_start_is_the_recipe_the_demo_serves(tmp_path, capsys, sface):
    """``phenolens train --init lda --epochs 0`` writes the head ``fit_lda_head`` fits (each
    face and its mirror image, with their neutral edits), not a second recipe."""
    import numpy as np

    from encoder.models.finetuned import load_finetuned
    from research.synth import load_face_set
    from research.train import embed_features, extract_features, fit_lda_head

    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--photos", PHOTOS, "--classes",
                 "wide_eyes,small_chin,broad_nose", "--size", "3", "--eval-size", "1",
                 "--split", "train=0.67,test=0.33"]) == 0
    ckpt = tmp_path / "lda.pt"
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--init", "lda",
                 "--epochs", "0", "--json"]) == 0
    capsys.readouterr()
    served = load_finetuned(ckpt)
    train = load_face_set(data, "train")
    fitted = fit_lda_head(sface, train.images, train.labels, train.subjects,
                          train.image_ids).model
    assert served.spec.embedding_dim == 2
    maps = extract_features(sface, train.images)
    np.testing.assert_allclose(embed_features(served, maps), embed_features(fitted, maps),
                               atol=1e-4)
    # the mirror images are part of the fit: without them the head differs
    unmirrored = fit_lda_head(sface, train.images, train.labels, train.subjects,
                              train.image_ids, mirror=False).model
    assert np.abs(embed_features(unmirrored, maps) - embed_features(fitted, maps)).max() > 1e-2
