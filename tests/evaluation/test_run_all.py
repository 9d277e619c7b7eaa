"""bench.run_all: the parsers turn each benchmark's output into summary ratios."""

from __future__ import annotations

import json

import pytest

from bench import run_all

EXPLAIN_OUT = """  sface K=10: done

torch 2.13.0, 2 threads, medians of 2 (peers 1); times in ms

| encoder | K | encode | ours cached | ours full | pytorch-grad-cam | captum | cached / encode | full / encode | grad-cam / full | captum / full |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| sface | 10 | 20.0 | 40.0 | 100.0 | 2000 | 1500 | 2.00x | 5.00x | 20.0x | 15.0x |
"""


def test_explain_table_gives_the_issue_targets_against_the_served_path():
    rows = {r.goal: r for r in run_all.parse_explain(EXPLAIN_OUT, "") if r.goal}
    assert set(rows) == {"similarity", "grad-cam", "captum"}
    assert rows["similarity"].value == pytest.approx(2.0) and rows["similarity"].met is False  # > 1.5x
    assert rows["grad-cam"].value == pytest.approx(50.0) and rows["grad-cam"].met is True  # 2000 / 40
    assert rows["captum"].value == pytest.approx(37.5) and rows["captum"].met is True


def test_gallery_progress_lines_give_numpy_ratios_and_the_auto_recall():
    record = {
        "n": 10000,
        "numpy_1_ms": 2.0,
        "gallery_1_ms": 1.0,
        "numpy_64_ms": 30.0,
        "gallery_64_ms": 40.0,
        "exact_equals_numpy": 1.0,
        "auto": "Exact",
        "auto_1_ms": 1.1,
        "auto_recall10": 1.0,
    }
    err = f"#   10,000: built (3 s)\n# 10,000 records done in 12 s: {json.dumps(record)}\n"
    rows = run_all.parse_gallery("", err)
    assert [r.value for r in rows] == pytest.approx([2.0, 0.75, 1.0])
    assert [r.met for r in rows] == [True, False, True]


def test_service_json_gives_latency_ratios_to_encode():
    out = json.dumps(
        {
            "latency": {
                "Encode (photo)": {"p50_ms": 200.0},
                "Explain (photo, top 3)": {"p50_ms": 500.0},
            }
        }
    )
    (row,) = run_all.parse_service("warming up\n" + out, "")
    assert row.value == pytest.approx(2.5)


def test_unparseable_output_is_reported_not_raised(tmp_path):
    bench = run_all.Bench(
        "echo", "bench.run_all", ("--only", "nonexistent"), (), run_all.parse_explain
    )
    outcome, rows = run_all.run_bench(bench, False, tmp_path, timeout=60)
    assert outcome.status in ("failed", "unparsed") and rows == []


def test_pipeline_and_encoder_json_give_ratios():
    pipeline = json.dumps(
        {
            "threads": 2,
            "rows": [
                {
                    "photo": "a.jpg",
                    "decode_ms": 5.0,
                    "detect_ms": 100.0,
                    "detect_cpu_ms": 150.0,
                    "align_ms": 1.0,
                    "warp_back_ms": 0.5,
                },
                {
                    "photo": "b.jpg",
                    "decode_ms": 15.0,
                    "detect_ms": 300.0,
                    "detect_cpu_ms": 350.0,
                    "align_ms": 3.0,
                    "warp_back_ms": 0.5,
                },
            ],
        }
    )
    detect_vs_align, decode_vs_detect = run_all.parse_pipeline(pipeline, "")  # no 640x640 row
    assert detect_vs_align.value == pytest.approx(100.0)
    assert decode_vs_detect.value == pytest.approx(10.0 / 200.0)
    encoder = json.dumps(
        {
            "view_scheme": "sface:orig",
            "threads": 2,
            "cosine": {},
            "timings": {"a.jpg": {"embed_ms": 40.0, "detect_ms": 200.0}},
            "embed_per_image_batch8_ms": 10.0,
        }
    )
    batching, detect_vs_embed = run_all.parse_encoder(encoder, "")
    assert batching.value == pytest.approx(4.0)
    assert detect_vs_embed.value == pytest.approx(5.0)


def test_pipeline_reports_the_detector_target_on_the_640_square_photo():
    rows = [{"photo": "t1@640x640", "detector": "yunet", "decode_ms": 2.0, "detect_ms": 19.0,
             "detect_cpu_ms": 9.5, "align_ms": 0.2}]
    detector, *_ = run_all.parse_pipeline(json.dumps({"threads": 1, "rows": rows}), "")
    assert detector.goal == "detector" and detector.value == pytest.approx(9.5) and detector.met is True
    assert detector.denominator is None and "wall 19.0 ms" in detector.what


def test_contrast_target_is_judged_at_k_10_only():
    doc = {"contrast": [{"k": 1, "contrast_cached_ms": 40.0, "encode_ms": 10.0, "cached_per_encode": 4.0},
                        {"k": 10, "contrast_cached_ms": 25.0, "encode_ms": 10.0, "cached_per_encode": 2.5}],
           "peers": []}
    k1, k10 = run_all.parse_contrast(json.dumps(doc), "")
    assert (k1.met, k1.goal) == (None, "") and (k10.met, k10.goal) == (True, "contrast")


def test_one_million_recall_is_judged_at_the_galleries_k_factor():
    from gallery.index import DEFAULT_K_FACTOR

    doc = {"n": 1_000_000, "threads": 1, "indexes": [{"factory": "PQ64x4fs,RFlat", "knob": "k_factor", "build_s": 3,
           "points": [{"value": 8, "recall10": 0.93, "ms_1q": 1.2},
                      {"value": DEFAULT_K_FACTOR, "recall10": 0.98, "ms_1q": 1.6}]}]}
    rows = run_all.parse_gallery_1m("", f"# PQ k_factor 8: ...\n# ann done: {json.dumps(doc)}\n")
    judged = [r for r in rows if r.goal == "recall-1m"]
    assert len(rows) == 2 and len(judged) == 1 and judged[0].value == pytest.approx(0.98) and judged[0].met


def test_service_gives_the_photo_explain_target():
    lat = {"Encode (photo)": 60.0, "Encode (aligned crop)": 40.0, "Explain photo top 10 cached": 150.0,
           "Explain crop top 10 cached": 100.0}
    out = json.dumps({"latency": {name: {"p50_ms": v} for name, v in lat.items()}})
    photo = next(r for r in run_all.parse_service(out, "") if r.goal == "photo-explain")
    assert photo.value == pytest.approx(150.0 / 120.0) and photo.met is True
    lat["Encode (photo)"] = 35.0  # faster than the crop: too few calls on a busy machine
    out = json.dumps({"latency": {name: {"p50_ms": v} for name, v in lat.items()}})
    noisy = next(r for r in run_all.parse_service(out, "") if r.goal == "photo-explain")
    assert noisy.met is None and "not judged" in noisy.what
    assert dict((k, s) for k, _, s in run_all.target_status([noisy]))["photo-explain"] == "not measured"


def test_region_effects_are_read_from_measure_and_missing_means_not_measured(tmp_path):
    (row,) = run_all.parse_effects(json.dumps({"ms_per_hit": 30.0, "encode_ms": 12.0, "ratio": 2.5}), "")
    assert row.goal == "effects" and row.value == pytest.approx(2.5) and row.met is True
    absent = run_all.Bench("effects", "bench.no_such_bench", ("-c", run_all.EFFECTS_CALL, "1"), (),
                           run_all.parse_effects)
    outcome, rows = run_all.run_bench(absent, False, tmp_path, timeout=60)
    assert outcome.status == "missing" and rows == []
    status = dict((key, s) for key, _, s in run_all.target_status([row]))
    assert status["effects"] == "met" and status["detector"] == "not measured"
    table = run_all.summary_table([row], [outcome])
    assert "region effects ≤ 3× one encode per hit | met" in table and "| not measured |" in table


def test_the_effects_call_runs_measure_in_its_own_process(tmp_path, monkeypatch):
    """A stand-in module with the agreed signature, found on PYTHONPATH, is called as make bench calls it."""
    pkg = tmp_path / "fakebench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "effects.py").write_text(
        "def measure(reps: int) -> dict:\n"
        "    return {'ms_per_hit': 10.0 * reps, 'encode_ms': 5.0, 'ratio': 2.0 * reps}\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    call = run_all.EFFECTS_CALL.replace("bench.bench_effects", "fakebench.effects")
    bench = run_all.Bench("effects", "json", ("-c", call, "2"), (), run_all.parse_effects)
    outcome, (row,) = run_all.run_bench(bench, False, tmp_path, timeout=60)
    assert outcome.status == "ok" and row.value == pytest.approx(4.0) and row.met is False


def test_gallery_ratio_is_judged_on_cpu_time_where_measured():
    record = {"n": 1000, "numpy_1_ms": 2.0, "gallery_1_ms": 4.0, "numpy_1_cpu_ms": 1.0, "gallery_1_cpu_ms": 0.8,
              "numpy_64_ms": 30.0, "gallery_64_ms": 20.0, "numpy_64_cpu_ms": 30.0, "gallery_64_cpu_ms": 40.0,
              "exact_equals_numpy": 1.0, "auto": "Flat", "auto_1_ms": 1.0, "auto_recall10": 1.0}
    one, many, _ = run_all.parse_gallery("", f"# 1,000 records done in 3 s: {json.dumps(record)}\n")
    assert one.value == pytest.approx(1.25) and one.met and "wall 0.50×" in one.what
    assert many.value == pytest.approx(0.75) and not many.met


def test_region_effects_are_judged_served_and_capped_for_hits_without_stored_edits():
    served, cap = run_all.parse_effects(json.dumps(
        {"ms_per_hit": 126.0, "encode_ms": 12.0, "ratio": 10.5, "kept_ms_per_hit": 30.0,
         "kept_ratio": 2.5}), "")
    assert (served.goal, served.value, served.met) == ("effects", pytest.approx(2.5), True)
    assert (cap.goal, cap.value, cap.met) == ("effects-cap", pytest.approx(10.5), False)
