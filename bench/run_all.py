"""Run every speed benchmark of PhenoLens and print one summary table of ratios.

    .venv/bin/python -m bench.run_all            # quick mode of every benchmark (make bench)
    .venv/bin/python -m bench.run_all --full     # each benchmark's own defaults (slow: 1M gallery)
    .venv/bin/python -m bench.run_all --only explain,gallery --json

Each benchmark runs as its own process (``python -m bench.<module> ...``), so one
failing or missing benchmark does not stop the others; its full output is kept
under ``--log-dir`` (default ``bench/results/run_all``). The summary has one row
per measured ratio: what was compared, both values, the ratio, the target where
an issue sets one, and whether it was met.
"""

from __future__ import annotations

import argparse
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
    return [
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
        gc_over_f = _num(gradcam) / _num(full)
        rows += [
            Ratio(
                "explain",
                f"{enc} top-{ks} two-sided maps (cached hit features) vs one encode",
                f"maps {cached} ms",
                f"encode {encode} ms",
                c_over_e,
                "≤ 3× at K=10" if at10 else "",
                c_over_e <= 3 if at10 else None,
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
                f"{enc} top-{ks}: pytorch-grad-cam pair by pair vs ours",
                f"grad-cam {gradcam} ms",
                f"ours {full} ms",
                gc_over_f,
                "≥ 10×",
                gc_over_f >= 10,
            ),
            Ratio(
                "explain",
                f"{enc} top-{ks}: captum pair by pair vs ours",
                f"captum {captum} ms",
                f"ours {full} ms",
                _num(captum) / _num(full),
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
        rows.append(Ratio("contrast", f"contrast maps top-{r['k']} (cached hits) vs one encode",
                          f"{r['contrast_cached_ms']:.1f} ms", f"{r['encode_ms']:.1f} ms", value,
                          "<= 3x", value <= 3.0))
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
            value = r[f"numpy_{q}_ms"] / r[f"gallery_{q}_ms"]
            rows.append(Ratio(
                "gallery", f"{n} records, {q} quer{'y' if q == '1' else 'ies'}: numpy brute force "
                f"vs the exact gallery (results equal numpy: {r['exact_equals_numpy']:.0%})",
                f"numpy {r[f'numpy_{q}_ms']:.2f} ms", f"gallery {r[f'gallery_{q}_ms']:.2f} ms",
                value, ">= 1", value >= 1.0))
        rows.append(Ratio("gallery", f"{n} records: auto index ({r['auto']}) recall@10",
                          f"{r['auto_1_ms']:.2f} ms per query", None, r["auto_recall10"],
                          ">= 0.95", r["auto_recall10"] >= 0.95))
    if not rows:
        raise ValueError("no finished gallery size in the output")
    return rows


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
    return rows


BENCHES: tuple[Bench, ...] = (
    Bench(
        "pipeline",
        "bench.bench_pipeline",
        ("--repeats", "1", "--json"),
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
    Bench("gallery", "bench.bench_gallery", ("--sizes", "10000"), (), parse_gallery),
    Bench("service", "bench.bench_service", ("--calls", "5", "--json"), ("--json",), parse_service),
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
    if importlib.util.find_spec(bench.module) is None:
        return Outcome(bench.name, "missing", 0.0, f"{bench.module} does not exist yet"), []
    cmd = [sys.executable, "-m", bench.module, *(bench.full_args if full else bench.quick_args)]
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
        return Outcome(bench.name, "ok", seconds, " ".join(cmd[2:])), bench.parse(
            proc.stdout, proc.stderr
        )
    except (ValueError, KeyError, IndexError, ZeroDivisionError) as exc:
        return Outcome(bench.name, "unparsed", seconds, f"{type(exc).__name__}: {exc}"), []


def summary_table(ratios: list[Ratio], outcomes: list[Outcome]) -> str:
    lines = [
        "| bench | comparison | numerator | denominator | ratio | target | met |",
        "|---|---|---|---|---:|---|---|",
    ]
    for r in ratios:
        met = "" if r.met is None else ("yes" if r.met else "NO")
        lines.append(
            f"| {r.bench} | {r.what} | {r.numerator} | {r.denominator or ''} "
            f"| {r.value:.2f}× | {r.target} | {met} |"
        )
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
    for bench in BENCHES:
        if bench.name not in wanted:
            continue
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
                {"ratios": [asdict(r) for r in ratios], "benches": [asdict(o) for o in outcomes]},
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
