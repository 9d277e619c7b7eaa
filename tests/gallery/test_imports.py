"""Imports (folder tree, CSV manifest, GestaltMatcher formats) and the portable export."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pickle

import numpy as np
import pytest

from gallery import DuplicateId, Gallery, ImportFormatError
from gallery.exchange import export_gallery, import_export, is_export
from gallery.imports import (
    import_folder,
    import_gm_encodings,
    import_gm_split,
    import_manifest,
    read_gm_encodings,
)
from gallery.png import encode_png


class FakeEmbedder:
    """Deterministic views from the file bytes (the real pipeline is tested in test_cli)."""

    def __init__(self, views: int = 2, dim: int = 8, fail_on: str | None = None):
        self.views, self.dim, self.fail_on, self.calls = views, dim, fail_on, 0

    def __call__(self, path):
        self.calls += 1
        if self.fail_on and self.fail_on in path.name:
            raise ValueError("no face found")
        seed = int.from_bytes(hashlib.sha256(path.read_bytes()).digest()[:8], "little")
        rng = np.random.default_rng(seed)
        crop = rng.integers(0, 255, size=(4, 4, 3), dtype=np.uint8)
        return rng.normal(size=(self.views, self.dim)).astype(np.float32), crop


def write_tree(root, labels=("alpha", "beta", "gamma"), per_label=3):
    for label in labels:
        (root / label).mkdir(parents=True)
        for i in range(per_label):
            (root / label / f"{label}_{i}.jpg").write_bytes(f"{label}-{i}".encode() * 10)
    (root / labels[0] / "notes.txt").write_text("not an image")
    return root


def test_folder_import_then_reimport_is_idempotent_without_reembedding(tmp_path):
    tree = write_tree(tmp_path / "tree")
    embed = FakeEmbedder()
    with Gallery.open(tmp_path / "g.db") as g:
        first = import_folder(g, tree, embed, progress=False)
        assert (first.added, first.unchanged, first.failed) == (9, 0, ())
        rec = g.get_image("beta/beta_1.jpg")
        assert rec.info.syndrome_id == rec.info.syndrome_name == "beta"
        assert rec.crop_png.startswith(b"\x89PNG")
        version, calls = g.version, embed.calls
        again = import_folder(g, tree, embed, progress=False)
        assert (again.added, again.unchanged) == (0, 9)
        assert embed.calls == calls and g.version == version
        (tree / "beta" / "beta_1.jpg").write_bytes(b"another photo")
        with pytest.raises(DuplicateId):
            import_folder(g, tree, embed, progress=False)
        updated = import_folder(g, tree, embed, progress=False, update=True)
        assert (updated.updated, updated.unchanged) == (1, 8)
        assert len(g) == 9


def test_images_that_fail_to_embed_are_reported_not_fatal(tmp_path):
    tree = write_tree(tmp_path / "tree")
    with Gallery.open(tmp_path / "g.db") as g:
        report = import_folder(g, tree, FakeEmbedder(fail_on="gamma_2"), progress=False)
    assert report.added == 8
    assert len(report.failed) == 1 and "gamma_2" in report.failed[0].item
    assert "ValueError" in report.failed[0].reason


def test_csv_manifest_import_reads_labels_and_relative_paths(tmp_path):
    write_tree(tmp_path / "tree", labels=("a",), per_label=2)
    manifest = tmp_path / "tree" / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "image_id", "subject_id", "syndrome_id", "syndrome_name", "omim_id", "genes"])
        w.writerow(["a/a_0.jpg", "P1-1", "P1", "CdLS", "Cornelia de Lange syndrome", "122470", "NIPBL;SMC1A"])
        w.writerow(["a/a_1.jpg", "P2-1", "P2", "KS", "Kabuki syndrome", "147920", "KMT2D"])
    with Gallery.open(tmp_path / "g.db") as g:
        assert import_manifest(g, manifest, FakeEmbedder(), progress=False).added == 2
        info = g.get_image("P1-1").info
    assert (info.subject_id, info.syndrome_id, info.syndrome_name, info.omim_id, info.genes) == (
        "P1", "CdLS", "Cornelia de Lange syndrome", "122470", ("NIPBL", "SMC1A"),
    )
    bad = tmp_path / "bad.csv"
    bad.write_text("file_name,who\nx.jpg,me\n")
    with Gallery.open(tmp_path / "g2.db") as g, pytest.raises(ImportFormatError):
        import_manifest(g, bad, FakeEmbedder())


def write_gm_fixtures(root):
    """A small, realistic GMDB-like set: split CSV, syndromes TSV, metadata pickle."""
    root.mkdir(parents=True, exist_ok=True)
    split = root / "gmdb_train_images_v1.1.0.csv"
    split.write_text("image_id,subject,label\n101,5001,12\n102,5001,12\n103,5002,40\n104,5003,40\n")
    tsv = root / "gmdb_syndromes_v1.1.0.tsv"
    tsv.write_text(
        "syndrome_id\tsyndrome_name\timage_ids\tsubject_ids\tnum_of_images\tnum_of_subjects\ttrain\tOMIM\n"
        "12\tCornelia de Lange syndrome\t[101, 102]\t[5001]\t2\t1\tTrue\t122470\n"
        "40\tKabuki syndrome\t[103, 104]\t[5002, 5003]\t2\t2\tTrue\t147920\n"
    )
    metadata = {
        "disorder_level_metadata": {
            101: {"patient_id": 5001, "disorder_internal_id": 12},
            102: {"patient_id": 5001, "disorder_internal_id": 12},
            103: {"patient_id": 5002, "disorder_internal_id": 40},
            104: {"patient_id": 5003, "disorder_internal_id": 40},
        },
        "gene_level_metadata": {
            101: [{"patient_id": 5001, "gene_internal_id": 7, "gene_name": "NIPBL", "gene_entrez_id": 25836}],
            102: [{"patient_id": 5001, "gene_internal_id": 7, "gene_name": "NIPBL", "gene_entrez_id": 25836}],
            103: [{"patient_id": 5002, "gene_internal_id": 9}],
            104: [{"patient_id": 5003, "gene_internal_id": 9}, {"patient_id": 5003, "gene_internal_id": 11}],
        },
        "gene_metadata": {
            7: {"gene_name": "NIPBL", "gene_entrez_id": 25836},
            9: {"gene_name": "KMT2D", "gene_entrez_id": 8085},
            11: {"gene_name": "KDM6A", "gene_entrez_id": 7403},
        },
        "disorder_metadata": {
            12: {"disorder_name": "Cornelia de Lange syndrome", "omim_id": 122470},
            40: {"disorder_name": "Kabuki syndrome", "omim_id": 147920},
        },
    }
    meta = root / "image_gene_and_syndrome_metadata.p"
    meta.write_bytes(pickle.dumps(metadata))
    return split, tsv, meta


def gm_encoding_rows(image_ids=(101, 102, 103, 104), dim=6, seed=0):
    """One row per (image, model, flip, gray) view, shuffled as GM files come."""
    rng = np.random.default_rng(seed)
    rows = []
    for image_id in image_ids:
        for model in ("glint360k_r100", "glint360k_r50"):
            for flip in (False, True):
                for gray in (False, True):
                    rows.append({
                        "img_name": f"{image_id}_crop_square.jpg", "model": model, "flip": flip,
                        "gray": gray, "class_conf": rng.random(),
                        "representations": rng.normal(size=dim).astype(np.float32).tolist(),
                    })
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def test_gm_split_import_with_syndromes_tsv(tmp_path):
    split, tsv, _ = write_gm_fixtures(tmp_path / "gm")
    images = tmp_path / "images"
    images.mkdir()
    for image_id in (101, 102, 103):  # 104 is missing on disk
        (images / f"{image_id}_crop_square.jpg").write_bytes(f"face {image_id}".encode())
    with Gallery.open(tmp_path / "g.db") as g:
        report = import_gm_split(g, split, images, FakeEmbedder(), syndromes_tsv=tsv, progress=False)
        assert report.added == 3 and [f.item for f in report.failed] == ["104"]
        info = g.get_image("103").info
    assert (info.subject_id, info.syndrome_id, info.syndrome_name, info.omim_id) == (
        "5002", "40", "Kabuki syndrome", "147920",
    )


@pytest.mark.parametrize("fmt", ["csv", "pickle-dict"])
def test_gm_encodings_import_groups_views_by_model_flip_gray(tmp_path, fmt):
    _, _, meta = write_gm_fixtures(tmp_path / "gm")
    rows = gm_encoding_rows() + gm_encoding_rows(image_ids=(999,), seed=3)  # 999 has no labels
    if fmt == "csv":
        path = tmp_path / "encodings.csv"
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=";")
            w.writeheader()
            for r in rows:
                w.writerow({**r, "representations": json.dumps(r["representations"])})
    else:
        path = tmp_path / "encodings.pkl"
        path.write_bytes(pickle.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    table = read_gm_encodings(path)
    assert table.view_scheme == (
        "glint360k_r100:orig,glint360k_r100:orig+gray,glint360k_r100:flip,glint360k_r100:flip+gray,"
        "glint360k_r50:orig,glint360k_r50:orig+gray,glint360k_r50:flip,glint360k_r50:flip+gray"
    )
    with Gallery.open(tmp_path / "g.db") as g:
        report = import_gm_encodings(g, path, metadata=meta)
        assert report.added == 4 and [f.item for f in report.failed] == ["999"]
        assert g.view_dims == (6,) * 8 and g.encoder_id == "glint360k_r100+glint360k_r50"
        rec = g.get_image("104")
        assert rec.info.genes == ("KMT2D", "KDM6A") and rec.info.syndrome_name == "Kabuki syndrome"
        want = {
            (r["model"], r["flip"], r["gray"]): r["representations"] for r in rows if r["img_name"].startswith("104")
        }
        ordered = [want[k] for k in sorted(want)]
        np.testing.assert_allclose(np.stack(rec.views), np.array(ordered, dtype=np.float32), atol=1e-6)
        again = import_gm_encodings(g, path, metadata=meta)
        assert (again.added, again.unchanged) == (0, 4)
        ranked = g.rank_syndromes(rec.views, top=None)
        assert ranked[0].syndrome_id == "40" and ranked[0].image_id == "104"
        assert g.rank_genes(rec.views, top=1)[0].gene == "KMT2D"


def test_gm_metadata_as_pandas_dataframes(tmp_path):
    pd = pytest.importorskip("pandas")
    _, _, meta = write_gm_fixtures(tmp_path / "gm")
    data = pickle.loads(meta.read_bytes())
    frames = {k: pd.DataFrame.from_dict(v, orient="index") for k, v in data.items() if k != "gene_level_metadata"}
    frames["gene_level_metadata"] = data["gene_level_metadata"]
    meta.write_bytes(pickle.dumps(frames))
    path = tmp_path / "enc.pkl"
    pd.DataFrame(gm_encoding_rows()).to_pickle(path)
    with Gallery.open(tmp_path / "g.db") as g:
        assert import_gm_encodings(g, path, metadata=meta).added == 4


def test_export_round_trip_keeps_records_embeddings_and_crops(tmp_path):
    tree = write_tree(tmp_path / "tree")
    out = tmp_path / "gallery.tar"
    with Gallery.open(tmp_path / "a.db", encoder_id="sface@1", view_scheme="sface:orig,sface:flip") as a:
        import_folder(a, tree, FakeEmbedder(), progress=False)
        a.delete_images(["alpha/alpha_0.jpg"])
        assert export_gallery(a, out) == 8
        originals = {r.info.image_id: r for r in a.iter_records()}
        query = originals["gamma/gamma_1.jpg"].views
        before = [(h.image_id, round(h.score, 6)) for h in a.search(query, k=8)]
    assert is_export(out) and not is_export(tree / "alpha" / "alpha_1.jpg")
    with Gallery.open(tmp_path / "b.db") as b:
        assert len(import_export(b, out).added) == 8
        assert (b.encoder_id, b.view_scheme) == ("sface@1", "sface:orig,sface:flip")
        for image_id, rec in originals.items():
            got = b.get_image(image_id)
            assert got.info.syndrome_id == rec.info.syndrome_id and got.crop_png == rec.crop_png
            for x, y in zip(got.views, rec.views, strict=True):
                np.testing.assert_array_equal(x, y)
        assert [(h.image_id, round(h.score, 6)) for h in b.search(query, k=8)] == before
        assert len(import_export(b, out).unchanged) == 8


def test_png_encoder_round_trips_through_pillow():
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(rgb)))), rgb)
    gray = rgb[..., 0]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(gray)))), gray)
