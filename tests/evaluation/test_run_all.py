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


def test_explain_table_gives_the_issue_targets():
    rows = {r.what: r for r in run_all.parse_explain(EXPLAIN_OUT, "")}
    cached = rows["sface top-10 two-sided maps (cached hit features) vs one encode"]
    assert cached.value == pytest.approx(2.0) and cached.met is True
    peer = rows["sface top-10: pytorch-grad-cam pair by pair vs ours"]
    assert peer.value == pytest.approx(20.0) and peer.met is True


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
    detect_vs_align, decode_vs_detect = run_all.parse_pipeline(pipeline, "")
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
