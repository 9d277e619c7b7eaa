"""Run every speed benchmark of PhenoLens and print one summary table of ratios.

    .venv/bin/python -m bench.run_all            # quick mode of every benchmark (make bench)
    .venv/bin/python -m bench.run_all --with-1m  # ... and the exact gallery at 1M records (minutes)
    PHENOLENS_BENCH_1M=1 make bench              # the same through make
    .venv/bin/python -m bench.run_all --full     # each benchmark's own defaults (slow)
    .venv/bin/python -m bench.run_all --only explain,gallery --json

Each benchmark runs as its own process (``python -m bench.<module> ...``), so one
failing or missing benchmark does not stop the others; its full output is kept
under ``--log-dir`` (default ``bench/results/run_all``). The summary has one row
per measured ratio: what was compared, both values, the ratio, the target where
an issue sets one, and whether it was met. Below it, every target the project is
measured against (``TARGETS``) with met / NOT MET, or "not measured" where its
benchmark is missing, failed or was not selected. Region effects come from
``bench.bench_effects.measure(reps)`` where that module exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Ratio:
    """One row of the summary: ``numerator / denominator`` (or a plain value when
    ``denominator`` is None) with an optional target."""

    bench: str
    what: str
    numerator: str
    denominator: str | None
    value: float
    target: str = ""
    met: bool | None = None
    goal: str = ""  # the key in TARGETS this row is measured against


# Every target the benchmarks are measured against (issues 4, 12, 15, 20, 22): key -> what.
TARGETS: dict[str, str] = {
    "contrast": "contrast maps for the top 10 (cached hits) ≤ 3× one encode",
    "similarity": "similarity maps + Grad-CAM for the top 10 (cached hits, the served path) ≤ 1.5× one encode",
    "grad-cam": "pytorch-grad-cam pair by pair ≥ 25× slower than the served path (K = 10)",
    "captum": "captum pair by pair ≥ 8× slower than the served path (K = 10)",
    "detector": "default detector ≤ 15 ms for a 640×640 photo on one core",
    "photo-explain": "Explain of a photo (top 10) ≤ 1.5× Explain of its aligned crop + detection",
    "gallery": "gallery ≥ 1× numpy brute force (1 and 64 queries, every size measured), results equal numpy",
    "recall-1m": "1M records: recall@10 ≥ 0.95 under 10 ms per query",
    "effects": "region effects ≤ 3× one encode per hit",
    "effects-cap": "region effects never more than 10× one encode per hit (hits without stored neutral edits)",
}


@dataclass(frozen=True)
class Bench:
    name: str
    module: str
    quick_args: tuple[str, ...]
    full_args: tuple[str, ...]
    parse: Callable[[str, str], list[Ratio]]  # (stdout, stderr) -> rows


# ---------------------------------------------------------------------- parsers


def _json_tail(text: str) -> dict:
    """The last JSON object printed (benchmarks print it after any progress lines)."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in the output")
    return json.loads(text[start:])


def _markdown_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and not set(line) <= set("|-: "):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _num(cell: str) -> float:
    m = re.search(r"-?[\d,]*\.?\d+(?:e-?\d+)?", cell.replace(",", ""))
    if not m:
        raise ValueError(f"no number in {cell!r}")
    return float(m.group(0))


def parse_pipeline(out: str, err: str) -> list[Ratio]:
    rows = _json_tail(out)["rows"]
    found = [r for r in rows if "align_ms" in r]
    detect = sum(r["detect_ms"] for r in found) / len(found)
    detect_cpu = sum(r["detect_cpu_ms"] for r in found) / len(found)
    align = sum(r["align_ms"] for r in found) / len(found)
    decode = sum(r["decode_ms"] for r in rows) / len(rows)
    square = [r for r in rows if r["photo"] == "t1@640x640"]
    detector = []
    for r in square:
        detector.append(Ratio(
            "pipeline",
            f"{r['detector']} on a 640×640 photo (6 faces), one core: CPU time of the call "
            f"(wall {r['detect_ms']:.1f} ms on this shared machine)",
            f"cpu {r['detect_cpu_ms']:.1f} ms", None, r["detect_cpu_ms"],
            "≤ 15 ms", r["detect_cpu_ms"] <= 15.0, "detector",
        ))
    return detector + [
        Ratio(
            "pipeline",
            "face detection (the default detector) vs alignment (mean over photos)",
            f"detect {detect:.1f} ms (cpu {detect_cpu:.1f})",
            f"align {align:.2f} ms",
            detect / align,
        ),
        Ratio(
            "pipeline",
            "decoding vs detection",
            f"decode {decode:.1f} ms",
            f"detect {detect:.1f} ms",
            decode / detect,
        ),
    ]


def parse_encoder(out: str, err: str) -> list[Ratio]:
    data = _json_tail(out)
    timings = list(data["timings"].values())
    embed = sum(t["embed_ms"] for t in timings) / len(timings)
    detect = sum(t["detect_ms"] for t in timings) / len(timings)
    at8 = data["embed_per_image_batch8_ms"]
    return [
        Ratio(
            "encoder",
            f"embed one image vs per image in a batch of 8 ({data['view_scheme']})",
            f"batch 1: {embed:.1f} ms",
            f"batch 8: {at8:.1f} ms/img",
            embed / at8,
        ),
        Ratio(
            "encoder",
            "detection vs embedding of one photo",
            f"detect {detect:.1f} ms",
            f"embed {embed:.1f} ms",
            detect / embed,
        ),
    ]


def parse_explain(out: str, err: str) -> list[Ratio]:
    rows = []
    table = [r for r in _markdown_rows(out) if len(r) == 11 and r[0] != "encoder"]
    for enc, k, encode, cached, full, gradcam, captum, *_ in table:
        ks = int(k)
        at10 = ks == 10
        c_over_e = _num(cached) / _num(encode)
        gc_over_c = _num(gradcam) / _num(cached)
        cp_over_c = _num(captum) / _num(cached)
        rows += [
            Ratio(
                "explain",
                f"{enc} top-{ks} similarity maps + Grad-CAM (cached hit features, the served path) vs one encode",
                f"maps {cached} ms",
                f"encode {encode} ms",
                c_over_e,
                "≤ 1.5×" if at10 else "",
                c_over_e <= 1.5 if at10 else None,
                "similarity" if at10 and enc == "sface" else "",
            ),
            Ratio(
                "explain",
                f"{enc} top-{ks} two-sided maps (hits forwarded) vs one encode",
                f"maps {full} ms",
                f"encode {encode} ms",
                _num(full) / _num(encode),
            ),
            Ratio(
                "explain",
                f"{enc} top-{ks}: pytorch-grad-cam pair by pair vs ours (served path, cached)",
                f"grad-cam {gradcam} ms",
                f"ours {cached} ms",
                gc_over_c,
                "≥ 25×" if at10 else "",
                gc_over_c >= 25 if at10 else None,
                "grad-cam" if at10 and enc == "sface" else "",
            ),
            Ratio(
                "explain",
                f"{enc} top-{ks}: captum pair by pair vs ours (served path, cached)",
                f"captum {captum} ms",
                f"ours {cached} ms",
                cp_over_c,
                "≥ 8×" if at10 else "",
                cp_over_c >= 8 if at10 else None,
                "captum" if at10 and enc == "sface" else "",
            ),
        ]
    if not rows:
        raise ValueError("no benchmark table in the output")
    return rows


def parse_contrast(out: str, err: str) -> list[Ratio]:
    doc = _json_tail(out)
    rows = []
    for r in doc["contrast"]:
        value = r["cached_per_encode"]
        at10 = r["k"] == 10
        rows.append(Ratio("contrast", f"contrast maps top-{r['k']} (cached hits) vs one encode",
                          f"{r['contrast_cached_ms']:.1f} ms", f"{r['encode_ms']:.1f} ms", value,
                          "≤ 3×" if at10 else "", value <= 3.0 if at10 else None,
                          "contrast" if at10 else ""))
    for p in doc["peers"]:
        rows.append(Ratio("contrast", f"{p['method']} (one pair) vs contrast (one pair)",
                          f"{p['pair_ms']:.0f} ms", "contrast", p["times_contrast_pair"]))
    return rows


def parse_gallery(out: str, err: str) -> list[Ratio]:
    results = [
        json.loads(line.split(": ", 1)[1])
        for line in (err + "\n" + out).splitlines()
        if line.startswith("# ") and "records done" in line
    ]
    rows = []
    for r in results:
        n = f"{r['n']:,}"
        for q in ("1", "64"):
            wall = r[f"numpy_{q}_ms"] / r[f"gallery_{q}_ms"]
            # judged on the calls' CPU time where measured (one thread: the work itself; the
            # wall time of a shared machine moves with the others' load), wall shown beside
            cpu = r[f"numpy_{q}_cpu_ms"] / r[f"gallery_{q}_cpu_ms"] if f"gallery_{q}_cpu_ms" in r else None
            value = wall if cpu is None else cpu
            clock = "" if cpu is None else f" (CPU time; wall {wall:.2f}×)"
            rows.append(Ratio(
                "gallery", f"{n} records, {q} quer{'y' if q == '1' else 'ies'}: numpy brute force "
                f"vs the exact gallery{clock} (results equal numpy: {r['exact_equals_numpy']:.0%})",
                f"numpy {r[f'numpy_{q}_ms']:.3f} ms", f"gallery {r[f'gallery_{q}_ms']:.3f} ms",
                value, "≥ 1×", value >= 1.0 and r["exact_equals_numpy"] == 1.0, "gallery"))
            if f"read_{q}_ms" in r:  # search_batch makes its Hits on first read: that read too
                rows.append(Ratio(
                    "gallery", f"{n} records, {q} quer{'y' if q == '1' else 'ies'}: numpy brute force "
                    "vs the exact gallery with every Hit object made (wall)",
                    f"numpy {r[f'numpy_{q}_ms']:.3f} ms", f"gallery {r[f'read_{q}_ms']:.3f} ms",
                    r[f"numpy_{q}_ms"] / r[f"read_{q}_ms"]))
        rows.append(Ratio("gallery", f"{n} records: auto index ({r['auto']}) recall@10",
                          f"{r['auto_1_ms']:.3f} ms per query", None, r["auto_recall10"],
                          "≥ 0.95", r["auto_recall10"] >= 0.95))
    if not rows:
        raise ValueError("no finished gallery size in the output")
    return rows


def parse_gallery_1m(out: str, err: str) -> list[Ratio]:
    """The auto index at 1M records (``bench_gallery --ann 1000000 --auto-only``): each k_factor,
    the target judged at the one the gallery uses."""
    from gallery.index import DEFAULT_K_FACTOR

    line = next(x for x in (err + "\n" + out).splitlines() if x.startswith("# ann done: "))
    doc = json.loads(line.split(": ", 1)[1])
    rows = []
    for index in doc["indexes"]:
        for p in index["points"]:
            used = index["knob"] == "k_factor" and p["value"] == DEFAULT_K_FACTOR
            cpu = p.get("cpu_ms_1q", p["ms_1q"])
            ok = p["recall10"] >= 0.95 and min(cpu, p["ms_1q"]) < 10.0
            rows.append(Ratio(
                "gallery", f"{doc['n']:,} records: {index['factory']} {index['knob']} {p['value']}"
                f"{' (the default)' if used else ''} recall@10, one query ({doc['threads']} thread)",
                f"cpu {cpu:.2f} ms (wall {p['ms_1q']:.2f} ms) per query", None, p["recall10"],
                "≥ 0.95 under 10 ms" if used else "", ok if used else None, "recall-1m" if used else ""))
    if not rows:
        raise ValueError("no approximate index in the output")
    return rows


def parse_effects(out: str, err: str) -> list[Ratio]:
    """``bench.bench_effects.measure(reps)``'s dict: ms_per_hit, encode_ms, ratio."""
    d = _json_tail(out)
    ratio = float(d["ratio"])
    encode = f"encode {float(d['encode_ms']):.1f} ms"
    if "kept_ratio" not in d:
        return [Ratio("effects", "region effects per hit vs one encode",
                      f"{float(d['ms_per_hit']):.1f} ms per hit", encode, ratio, "≤ 3×",
                      ratio <= 3.0, "effects")]
    # Served: gallery faces' neutral edits come from the feature store (made at import), so
    # a hit costs the edits that depend on the query; the cap holds for hits without them.
    kept = float(d["kept_ratio"])
    return [Ratio("effects", "region effects per hit (served: hits' neutral edits stored at import)",
                  f"{float(d['kept_ms_per_hit']):.1f} ms per hit", encode, kept, "≤ 3×",
                  kept <= 3.0, "effects"),
            Ratio("effects", "region effects per hit, hits without stored neutral edits",
                  f"{float(d['ms_per_hit']):.1f} ms per hit", encode, ratio, "≤ 10× (the cap)",
                  ratio <= 10.0, "effects-cap")]


def parse_service(out: str, err: str) -> list[Ratio]:
    lat = _json_tail(out)["latency"]
    enc = lat["Encode (photo)"]["p50_ms"]
    rows = [
        Ratio(
            "service",
            f"{name} p50 vs Encode (photo) p50",
            f"{r['p50_ms']:.1f} ms",
            f"{enc:.1f} ms",
            r["p50_ms"] / enc,
        )
        for name, r in lat.items()
        if name != "Encode (photo)"
    ]
    p50 = {name: r["p50_ms"] for name, r in lat.items()}
    if "Explain photo top 10 cached" in p50 and "Encode (aligned crop)" in p50:
        from bench.bench_service import detection_ms

        detection = detection_ms(p50)
        photo, crop = p50["Explain photo top 10 cached"], p50["Explain crop top 10 cached"]
        ratio = photo / (crop + detection)
        judged = detection > 0  # else the calls were too few for the load: the difference is noise
        rows.insert(0, Ratio(
            "service", "Explain of a photo (top 10, cached) vs its aligned crop + detection "
            "(Encode photo − Encode aligned crop)" + ("" if judged else ": not judged, detection ≤ 0 ms"),
            f"photo {photo:.1f} ms", f"crop {crop:.1f} + detection {detection:.1f} ms", ratio,
            "≤ 1.5×", ratio <= 1.5 if judged else None, "photo-explain"))
    return rows


GALLERY_SIZES = "1000,10000,100000"
GALLERY_SIZES_1M = GALLERY_SIZES + ",1000000"
# bench.bench_effects.measure(reps) -> {"ms_per_hit", "encode_ms", "ratio"}, run in its own process.
EFFECTS_CALL = "import json, sys; from bench.bench_effects import measure; print(json.dumps(measure(int(sys.argv[1]))))"

BENCHES: tuple[Bench, ...] = (
    Bench(
        "pipeline",
        "bench.bench_pipeline",
        ("--repeats", "9", "--json"),
        ("--json",),
        parse_pipeline,
    ),
    Bench(
        "encoder", "bench.bench_encoder", ("--repeats", "1", "--json"), ("--json",), parse_encoder
    ),
    Bench(
        "explain",
        "bench.bench_explain",
        ("--encoders", "sface", "--ks", "1", "10", "--reps", "2"),
        (),
        parse_explain,
    ),
    Bench("contrast", "bench.bench_contrast", ("--ks", "1", "10", "--json"), ("--json",),
          parse_contrast),
    Bench("gallery", "bench.bench_gallery", ("--sizes", GALLERY_SIZES),
          ("--sizes", GALLERY_SIZES_1M), parse_gallery),
    Bench("gallery-1m", "bench.bench_gallery", ("--ann", "1000000", "--auto-only"),
          ("--ann", "1000000"), parse_gallery_1m),
    Bench("service", "bench.bench_service", ("--calls", "5", "--json"), ("--json",), parse_service),
    Bench("effects", "bench.bench_effects", ("-c", EFFECTS_CALL, "3"), ("-c", EFFECTS_CALL, "10"),
          parse_effects),
)


# ------------------------------------------------------------------------- run


@dataclass(frozen=True)
class Outcome:
    bench: str
    status: str  # "ok", "missing", "failed", "unparsed"
    seconds: float
    detail: str = ""


def run_bench(
    bench: Bench, full: bool, log_dir: Path, timeout: float | None
) -> tuple[Outcome, list[Ratio]]:
    try:
        found = importlib.util.find_spec(bench.module) is not None
    except ImportError:
        found = False
    if not found:
        return Outcome(bench.name, "missing", 0.0, f"{bench.module} does not exist yet"), []
    args = bench.full_args if full else bench.quick_args
    cmd = [sys.executable, *(args if args[:1] == ("-c",) else ("-m", bench.module, *args))]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ},
        )
    except subprocess.TimeoutExpired:
        return Outcome(
            bench.name, "failed", time.perf_counter() - t0, f"timed out after {timeout:g} s"
        ), []
    seconds = time.perf_counter() - t0
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"{bench.name}.out").write_text(proc.stdout)
    (log_dir / f"{bench.name}.err").write_text(proc.stderr)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return Outcome(bench.name, "failed", seconds, f"exit {proc.returncode}: {last}"), []
    try:
        detail = " ".join(cmd[2:]) if cmd[1] == "-m" else f"{bench.module}.measure({cmd[-1]})"
        return Outcome(bench.name, "ok", seconds, detail), bench.parse(
            proc.stdout, proc.stderr
        )
    except (ValueError, KeyError, IndexError, ZeroDivisionError) as exc:
        return Outcome(bench.name, "unparsed", seconds, f"{type(exc).__name__}: {exc}"), []


def _value(r: Ratio) -> str:
    return f"{r.value:.2f}×" if r.denominator is not None else f"{r.value:.3g}"


def target_status(ratios: list[Ratio]) -> list[tuple[str, str, str]]:
    """(target key, what, status) for every target in TARGETS: "met" when every row
    measured against it met it, "NOT MET" when one did not, "not measured" when none ran."""
    out = []
    for key, what in TARGETS.items():
        rows = [r for r in ratios if r.goal == key and r.met is not None]
        status = "not measured" if not rows else "met" if all(r.met for r in rows) else "NOT MET"
        out.append((key, what, status))
    return out


def summary_table(ratios: list[Ratio], outcomes: list[Outcome]) -> str:
    lines = [
        "| bench | comparison | numerator | denominator | value | target | met |",
        "|---|---|---|---|---:|---|---|",
    ]
    for r in ratios:
        met = "" if r.met is None else ("yes" if r.met else "NO")
        lines.append(
            f"| {r.bench} | {r.what} | {r.numerator} | {r.denominator or ''} "
            f"| {_value(r)} | {r.target} | {met} |"
        )
    lines += ["", "Targets:", "", "| target | status | measured |", "|---|---|---|"]
    for key, what, status in target_status(ratios):
        measured = "; ".join(f"{_value(r)} ({r.numerator})" for r in ratios if r.goal == key)
        lines.append(f"| {what} | {status} | {measured} |")
    lines += ["", "| bench | status | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {o.bench} | {o.status} | {o.seconds:.0f} | {o.detail} |" for o in outcomes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run_all",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--full", action="store_true", help="each benchmark's default (slow) mode")
    parser.add_argument("--with-1m", action="store_true",
                        help="also the exact gallery at 1M records (minutes; or PHENOLENS_BENCH_1M=1)")
    parser.add_argument(
        "--only", help="comma-separated subset: " + ",".join(b.name for b in BENCHES)
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds per benchmark")
    parser.add_argument("--log-dir", type=Path, default=REPO / "bench" / "results" / "run_all")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    wanted = set(args.only.split(",")) if args.only else {b.name for b in BENCHES}
    unknown = wanted - {b.name for b in BENCHES}
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    ratios: list[Ratio] = []
    outcomes: list[Outcome] = []
    with_1m = args.with_1m or os.environ.get("PHENOLENS_BENCH_1M", "") not in ("", "0")
    for bench in BENCHES:
        if bench.name not in wanted:
            continue
        if bench.name == "gallery" and with_1m and not args.full:
            bench = dataclasses.replace(bench, quick_args=("--sizes", GALLERY_SIZES_1M))
        print(f"# running {bench.name} ...", file=sys.stderr, flush=True)
        outcome, rows = run_bench(bench, args.full, args.log_dir, args.timeout)
        print(
            f"# {bench.name}: {outcome.status} in {outcome.seconds:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        outcomes.append(outcome)
        ratios += rows
    if args.json:
        print(
            json.dumps(
                {"ratios": [asdict(r) for r in ratios], "benches": [asdict(o) for o in outcomes],
                 "targets": [dict(zip(("key", "what", "status"), t, strict=True)) for t in target_status(ratios)]},
                indent=1,
            )
        )
    else:
        print(
            f"PhenoLens benchmarks ({'full' if args.full else 'quick'} mode, {os.cpu_count()} CPU cores, "
            f"load average {os.getloadavg()[0]:.1f}); ratio = numerator / denominator\n"
        )
        print(summary_table(ratios, outcomes))
    failed = [o for o in outcomes if o.status in ("failed", "unparsed")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
