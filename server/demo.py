"""``make demo``: the syndrome workflow on synthetic syndromes, through a real server.

SYNTHETIC SYNDROMES, NOT PATIENTS: the bundled photos are of ordinary adults. Six
"syndromes" (``research.synth``: wide or narrow eyes, down-slanting eyes, a broad
nose, a long philtrum, a small chin) are planted on them as smooth local
deformations, with made-up OMIM-style numbers and gene symbols, so that the
syndrome and gene rankings, calibrated confidence and region words can be shown
on real faces whose answer is known.

Steps: split the 11 people who are not held out, seeded and subject-disjoint
(``split_people``), into 5 whose synthetic faces only train the encoder and 6 who make
the gallery (every syndrome on each); fit the served encoder on the 5 (``fit_head``:
SFace with a syndrome head, ``research.train.fit_lda_head``, closed form) — so the
server's leave-one-subject-out calibration on the gallery is honest: the head never saw
a gallery person, nor a held-out one; start ``phenolens serve`` with it as a subprocess
on a free loopback port with a fresh gallery and throwaway tokens; import the gallery
through the client (ImportGallery); match every held-out face (top-1 and top-3
syndrome accuracy, GestaltMatcher's macro rule; the calibrated confidence of its top
syndrome; the region its nearest same-syndrome face leans on first); explain the top 3
of two queries (overlays, pair figures) and write the match report of each
(``report.html``, ``report-2.html``), ``summary.md`` and ``summary.json`` into
``demo-output/``; stop the server with SIGTERM (graceful shutdown).

``python -m server.demo --build-gallery PATH`` writes the synthetic gallery of all 11
people, encoded by frozen SFace (``phenolens serve``'s default encoder), into a gallery
file without a server (``make serve`` uses it for its default gallery) and ``--queries
DIR`` writes the held-out query faces (the demo's) as PNG files.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from encoder.assets import REPO_ROOT

# The two held-out faces the reports show, chosen by a rule fixed before the demo's own
# numbers were seen: one syndrome planted on the eyes and one elsewhere, each the one
# ``phenolens evaluate planted`` (90 queries, 5 subject folds) finds leaning on its
# planted region most often with the served head (README: narrow eyes 0.93, long
# philtrum 0.80), on the first and the second held-out person.
CASES = (("grace_hopper", "narrow_eyes"), ("eileen_collins", "long_philtrum"))
# People (of the 11 not held out) whose synthetic faces train the served head and who stay
# out of the gallery; the other 6 keep every syndrome on 6 people for the calibration.
HEAD_PEOPLE = 5
# Training faces per syndrome and source photo of a head person (the gallery has 2).
HEAD_FACES_PER_SOURCE = 2
DISCLAIMER = ("The syndromes here are synthetic: smooth deformations planted on photos of "
              "ordinary adults, with made-up OMIM-style numbers and gene symbols. Nothing "
              "here says anything about a real syndrome or a real patient.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_serving(address: str, process: subprocess.Popen, timeout: float) -> float:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    started = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() - started < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} while starting")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - started
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"the server did not report SERVING within {timeout:g} s")


def make_cohort(seed: int = 0):
    """The synthetic ``research.synth.Cohort`` of all 11 people who are not held out, from
    the bundled photos (face detection included): ``make serve``'s default gallery."""
    from research import synth

    return synth.cohort(synth.load_source_faces(), synth.DEMO_HELD_OUT, seed=seed)


@dataclass(frozen=True)
class DemoSplit:
    """Who is who in the demo (subject ids, disjoint): ``head`` trains the served encoder,
    ``gallery`` is served, ``held_out`` are the queries."""

    head: tuple[str, ...]
    gallery: tuple[str, ...]
    held_out: tuple[str, ...]


def split_people(subjects, seed: int = 0, head_people: int = HEAD_PEOPLE) -> DemoSplit:
    """Split the people who are not held out (``research.synth.DEMO_HELD_OUT``) into
    ``head_people`` head-training people and the gallery, by ``research.synth.split_subjects``
    (a seeded permutation of the sorted ids); raises ValueError when the gallery would have
    fewer people than a syndrome needs for calibrated confidence."""
    from gallery.calibration import MIN_SUBJECTS
    from research.synth import DEMO_HELD_OUT, assert_subject_disjoint, split_subjects

    held = tuple(sorted(set(DEMO_HELD_OUT)))
    rest = sorted(set(subjects) - set(held))
    if len(rest) - head_people < MIN_SUBJECTS:
        raise ValueError(f"{len(rest)} people leave {len(rest) - head_people} for the "
                         f"gallery after {head_people} for the head; need {MIN_SUBJECTS}")
    parts = split_subjects(rest, {"head": head_people, "gallery": len(rest) - head_people},
                           seed=seed)
    split = DemoSplit(parts["head"], parts["gallery"], held)
    assert_subject_disjoint({"head": split.head, "gallery": split.gallery,
                             "held_out": split.held_out})
    return split


def make_demo_data(seed: int = 0, sources=None):
    """The demo's split, its cohort (every syndrome on each gallery person; the held-out
    people's query faces, the same as ``make_cohort``'s) and the head's training faces
    (``HEAD_FACES_PER_SOURCE`` per syndrome and source photo of each head person; they are
    never gallery or query faces). ``sources``: ``research.synth.SourceFace`` list
    (default: the bundled photos)."""
    from research import synth

    sources = synth.load_source_faces() if sources is None else sources
    split = split_people([s.subject for s in sources], seed)
    cohort = synth.cohort([s for s in sources if s.subject not in split.head],
                          split.held_out, seed=seed)
    head_sources = [s for s in sources if s.subject in split.head]
    training = list(synth.generate(
        head_sources, {c: HEAD_FACES_PER_SOURCE * len(head_sources) for c in synth.SYNDROMES},
        seed=seed, split="head"))
    return split, cohort, training


def record_of(sample) -> dict:
    """The gallery record of a synthetic sample (GalleryRecord fields)."""
    from research.synth import LABELS

    label = LABELS[sample.label]
    return {"image_id": sample.image_id, "subject_id": sample.subject,
            "syndrome_id": label.syndrome_id, "syndrome_name": label.name,
            "omim": label.omim, "genes": label.genes,
            "source": f"synthetic from {sample.source_id}"}


def build_gallery(path: Path, seed: int = 0) -> int:
    """Write the demo's synthetic gallery into ``path`` in-process (no server), with the
    default encoder and view scheme of ``phenolens serve``; returns the number of images."""
    from server.backend import Backend
    from server.config import load_config
    from server.limits import RequestScope

    cohort = make_cohort(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = Backend.from_config(load_config(None, gallery={"path": str(path)}))
    try:
        scope = RequestScope()
        items = [backend.entry_with_features(backend.pipeline.face(s.image, aligned=True),
                                             record_of(s), scope) for s in cohort.gallery]
        backend.add_images(items)
        return len(backend.gallery)
    finally:
        backend.close()


def fit_head(training, path: Path, seed: int = 0) -> dict:
    """Fit the demo's encoder on ``training`` (``research.synth.SynthSample`` list) and
    write it to ``path`` as a fine-tuned checkpoint: SFace with a syndrome head in closed
    form (``research.train.fit_lda_head``: each face and its mirror image, with their
    neutral edits — the server's neutral face pasted into one region, as region effects
    paste it — counted as variation within the syndrome). Returns what the summary says
    of it."""
    from encoder.models.finetuned import save_checkpoint
    from encoder.registry import create_encoder
    from explain.effects import bundled_neutral
    from research.train import TrainConfig, fit_lda_head

    t0 = time.monotonic()
    base = create_encoder("sface")
    people = sorted({s.subject for s in training})
    result = fit_lda_head(base, np.stack([s.image for s in training]),
                          [s.label for s in training], [s.subject for s in training],
                          [s.image_id for s in training], neutral=bundled_neutral().crop,
                          mirror=True, config=TrainConfig(init="lda", max_epochs=0, seed=seed))
    save_checkpoint(result.model, path, metadata={
        "demo": "synthetic syndromes", "seed": seed, "people": people})
    return {"name": "sface + syndrome head", "checkpoint": str(path),
            "dimensions": result.model.spec.embedding_dim, "people": people,
            "faces": len(training), "fit_s": round(time.monotonic() - t0, 2)}


def _has_faces(path: Path) -> bool:
    if not path.exists():
        return False
    from gallery import Gallery

    with Gallery.open(path, create=False) as gallery:
        return len(gallery) > 0


def write_queries(cohort, folder: Path) -> list[Path]:
    """Every held-out face as ``<subject>_<syndrome>.png`` (aligned 112x112 crops)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in cohort.queries:
        path = folder / f"{s.subject}_{s.label}.png"
        Image.fromarray(s.image).save(path)
        paths.append(path)
    return paths


def run(out: Path, seed: int = 0, head: bool = True) -> dict:
    """The demo into ``out``; ``head=False`` serves frozen SFace on the same gallery people
    instead (for comparison)."""
    import phenolens
    from phenolens import GalleryRecord, ImportItem

    from research.synth import LABELS, planted_region

    if out.exists():
        shutil.rmtree(out)
    (out / "overlays").mkdir(parents=True)
    work = out / "server"
    work.mkdir()
    t0 = time.monotonic()
    split, cohort, training = make_demo_data(seed)
    query_paths = write_queries(cohort, out / "queries")
    summary: dict = {"disclaimer": DISCLAIMER, "cohort": {
        "syndromes": {k: {"name": v.name, "omim": v.omim, "genes": list(v.genes),
                          "planted_region": v.region} for k, v in LABELS.items()},
        "gallery_subjects": list(cohort.gallery_subjects),
        "held_out_subjects": list(cohort.query_subjects),
        "head_subjects": list(split.head),
        "gallery_images": len(cohort.gallery), "query_images": len(cohort.queries),
        "head_training_images": len(training),
        "make_s": round(time.monotonic() - t0, 2)}}
    print(f"made {len(cohort.gallery)} synthetic gallery faces of {len(LABELS)} syndromes on "
          f"{len(cohort.gallery_subjects)} people; {len(cohort.queries)} held-out query faces "
          f"of {len(cohort.query_subjects)} other people; {len(training)} training faces of "
          f"{len(split.head)} more people for the encoder's syndrome head")
    if head:
        summary["encoder"] = fit_head(training, work / "syndrome-head.pt", seed)
        encoder = {"name": "finetuned", "weights": summary["encoder"]["checkpoint"]}
        print(f"fitted SFace's syndrome head on {len(split.head)} people who are not in the "
              f"gallery ({len(training)} faces and their mirror images) in "
              f"{summary['encoder']['fit_s']} s")
    else:
        summary["encoder"] = {"name": "sface (frozen)", "fit_s": 0.0}
        encoder = {"name": "sface"}

    port = _free_port()
    address = f"127.0.0.1:{port}"
    admin_token, read_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    config = {
        "listen": address,
        "gallery": {"path": str(work / "demo-gallery.sqlite")},
        "encoder": encoder,
        "auth": {"tokens": [{"name": "demo-admin", "scopes": ["admin"], "token": admin_token},
                            {"name": "demo-reader", "scopes": ["read"], "token": read_token}]},
        "log": {"level": "INFO"},
    }
    (work / "demo.yaml").write_text(json.dumps(config, indent=2))  # JSON is valid YAML
    log_file = open(work / "server.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--config", str(work / "demo.yaml")],
        cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    summary["server"] = {"address": address}
    try:
        summary["server"]["start_to_serving_s"] = round(
            _wait_until_serving(address, process, timeout=180), 2)
        print(f"server SERVING on {address}")
        with phenolens.Client(address, token=admin_token) as admin:
            items = [ImportItem(GalleryRecord("", **record_of(s)), image=s.image, aligned=True)
                     for s in cohort.gallery]
            t0 = time.monotonic()
            imported = admin.import_gallery(items)
            summary["gallery"] = {"images": imported.added + imported.unchanged,
                                  "import_s": round(time.monotonic() - t0, 2)}
            print(f"imported {imported.added} faces through ImportGallery")
        with phenolens.Client(address, token=read_token) as client:
            info = client.server_info()
            summary["server"].update(encoder_id=info.encoder_id, view_scheme=info.view_scheme,
                                     gallery_version=info.gallery_version)
            summary["held_out"] = h = _held_out(client, cohort)
            print(f"held-out syndrome accuracy (macro, {h['queries']} faces): top-1 "
                  f"{h['macro_top1']:.2f}, top-3 {h['macro_top3']:.2f}; the nearest face of "
                  f"the right syndrome leans on the planted region first: "
                  f"{h['leans_on_planted']}/{h['queries']}")
            summary["cases"] = []
            for n, (subject, label) in enumerate(CASES, start=1):
                path = next(p for p in query_paths if p.name == f"{subject}_{label}.png")
                report = "report.html" if n == 1 else f"report-{n}.html"
                case = _case(client, path, label, out, report)
                case["planted_region"] = planted_region(label)
                summary["cases"].append(case)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            summary["server"]["exit_code"] = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            summary["server"]["exit_code"] = process.wait()
        log_file.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(_markdown(summary))
    return summary


def _held_out(client, cohort) -> dict:
    """Match every held-out face: macro top-1/top-3 of the syndrome ranking (per syndrome
    the share of its queries ranked there, then the mean over syndromes), the calibrated
    confidence of its top syndrome, and the region its nearest face of the right syndrome
    leans on first (region effects, as the reports word them)."""
    from phenolens import Filters

    from research.synth import planted_region

    ranks: dict[str, list[int]] = {}
    faces = []
    for s in cohort.queries:
        match = client.match(s.image, aligned=True, top_k=1, top_syndromes=10, top_genes=0)
        order = [r.syndrome_id for r in match.syndromes]
        rank = order.index(s.label) + 1 if s.label in order else len(order) + 1
        ranks.setdefault(s.label, []).append(rank)
        same = _explain(client, s.image, top_k=1, filters=Filters(syndromes=(s.label,)))
        faces.append({"subject": s.subject, "syndrome": s.label, "rank": rank,
                      "top_syndrome": order[0] if order else None,
                      "top_confidence": (match.syndromes[0].confidence.probability
                                         if match.syndromes else None),
                      "same_syndrome_leans_on": _leans_on(same),
                      "planted_region": planted_region(s.label)})
    per = {k: {"top1": float(np.mean([r <= 1 for r in v])),
               "top3": float(np.mean([r <= 3 for r in v]))} for k, v in sorted(ranks.items())}
    return {"queries": len(cohort.queries),
            "macro_top1": float(np.mean([v["top1"] for v in per.values()])),
            "macro_top3": float(np.mean([v["top3"] for v in per.values()])),
            "leans_on_planted": sum(f["same_syndrome_leans_on"] == f["planted_region"]
                                    for f in faces),
            "confidence": _confidence_summary(faces),
            "per_syndrome": per, "faces": faces}


def _confidence_summary(faces: list[dict]) -> dict:
    """The top syndrome's calibrated confidence against whether it was right."""
    right = [f["top_confidence"] for f in faces
             if f["top_confidence"] is not None and f["rank"] == 1]
    wrong = [f["top_confidence"] for f in faces
             if f["top_confidence"] is not None and f["rank"] != 1]
    given = right + wrong
    return {"mean": float(np.mean(given)) if given else None,
            "mean_right": float(np.mean(right)) if right else None,
            "mean_wrong": float(np.mean(wrong)) if wrong else None,
            "over_99": sum(p > 0.99 for p in given), "given": len(given),
            "accuracy": float(np.mean([f["rank"] == 1 for f in faces])) if faces else None}


def _leans_on(explained) -> str | None:
    """The region the first explained match leans on most (its query side's region
    effects, largest loss of likeness first), or None without effects."""
    if not explained.explanations:
        return None
    effects_of = getattr(explained.explanations[0], "effects_of", None)
    fx = effects_of("query") if callable(effects_of) else None
    ranked = fx.ranked("alike", top=1) if fx is not None else ()
    return ranked[0][0] if ranked else None


def _words(e) -> str:
    """The report's words of a match (region effects per face when sent, else the maps')."""
    from phenolens.report import leans_on_outside, side_words

    words = "; ".join(f"{who}: {text}" for who, text in side_words(e, e.methods[0]))
    warning = leans_on_outside(e)
    return f"{words}. {warning.rstrip('.')}" if warning else words  # the caller ends it


def _explain(client, image, top_k: int = 3, **options):
    """Explain the top ``top_k`` with region effects where the client and server have them."""
    try:
        return client.explain(image, aligned=True, top_k=top_k, photo_maps=False,
                              effects=top_k, **options)
    except TypeError:  # a client without region effects
        return client.explain(image, aligned=True, top_k=top_k, photo_maps=False, **options)


def _case(client, path: Path, label: str, out: Path, report: str) -> dict:
    from research.synth import LABELS

    t0 = time.monotonic()
    client.report(path, out / report, aligned=True, top_k=3,
                  title=f"synthetic demo: {path.stem.replace('_', ' ')}")
    report_s = time.monotonic() - t0
    t0 = time.monotonic()
    explained = _explain(client, path)
    explain_s = time.monotonic() - t0
    match = explained.match
    matches = []
    for e in explained.explanations:
        files = {}
        for method in e.methods:
            f = e.save_overlay(out / "overlays" / f"{path.stem}_top{e.hit.rank}_{method}.png",
                               method, "both")
            files[method] = str(f.relative_to(out))
        r = e.hit.record
        matches.append({"rank": e.hit.rank, "image_id": r.image_id, "subject": r.subject_id,
                        "syndrome": r.syndrome_id, "cosine": round(e.hit.cosine, 4),
                        "words": _words(e), "overlays": files})
    top = match.syndromes[0] if match.syndromes else None
    return {
        "top_match_leans_on": _leans_on(explained),
        "query": str(path.relative_to(out)), "true_syndrome": label,
        "true_name": LABELS[label].name, "report": report,
        "report_s": round(report_s, 2), "explain_top3_s": round(explain_s, 2),
        "syndromes": [{"rank": s.rank, "syndrome": s.syndrome_id, "name": s.syndrome_name,
                       "omim": s.omim, "cosine": round(s.cosine, 4),
                       "confidence": s.confidence.probability} for s in match.syndromes[:6]],
        "genes": [{"rank": g.rank, "gene": g.gene, "cosine": round(g.cosine, 4),
                   "confidence": g.confidence.probability} for g in match.genes[:4]],
        "top_syndrome_confidence": top.confidence.describe() if top else None,
        "calibration_error": top.confidence.calibration_error if top else None,
        "explained": matches,
    }


def encoder_words(summary: dict) -> str:
    """One sentence of which encoder the demo served."""
    e, c = summary.get("encoder", {}), summary["cohort"]
    if "checkpoint" not in e:
        return "frozen SFace (no syndrome head)"
    return (f"SFace with a syndrome head ({e['dimensions']} dimensions) fitted in {e['fit_s']} s "
            f"on {e['faces']} synthetic faces (and their mirror images) of "
            f"{len(c['head_subjects'])} other people, none of them in the gallery or held out")


def _percent(p: float | None) -> str:
    return "–" if p is None else f"{100 * p:.0f} %"


def _confidence_words(h: dict) -> str:
    """The held-out faces' top-syndrome confidence against how often it was right."""
    c = h.get("confidence") or {}
    if not c.get("given"):
        return "Top-syndrome confidence: not given (no calibration)."
    return (f"Top-syndrome confidence (calibrated by the server leave-one-subject-out on the "
            f"gallery): mean {_percent(c['mean'])} against {_percent(c['accuracy'])} of top "
            f"syndromes right; {_percent(c['mean_right'])} when right, "
            f"{_percent(c['mean_wrong'])} when wrong; over 99 % on {c['over_99']} of "
            f"{c['given']} faces.")


def _markdown(summary: dict) -> str:
    s, g, h = summary["server"], summary.get("gallery", {}), summary.get("held_out", {})
    c = summary["cohort"]
    lines = [
        "# PhenoLens demo: synthetic syndromes", "",
        f"> **{summary['disclaimer']}**", "",
        f"Encoder served: {encoder_words(summary)}. People (a seeded, subject-disjoint "
        f"split): head {', '.join(c.get('head_subjects', []))}; gallery "
        f"{', '.join(c['gallery_subjects'])}.", "",
        f"Gallery: {g.get('images')} synthetic faces of {len(c['syndromes'])} syndromes on "
        f"{len(c['gallery_subjects'])} people, imported through the client in "
        f"{g.get('import_s')} s. Held out: {', '.join(c['held_out_subjects'])} "
        f"({c['query_images']} faces, every syndrome once each).", "",
        f"Held-out syndrome accuracy (GestaltMatcher's macro rule): top-1 "
        f"{h.get('macro_top1', float('nan')):.2f}, top-3 {h.get('macro_top3', float('nan')):.2f}; "
        f"the nearest face of the right syndrome leans on the planted region first: "
        f"{h.get('leans_on_planted')}/{h.get('queries')}.", "",
        _confidence_words(h), "",
        f"Server: `{s['address']}` (stopped when the demo ended), encoder "
        f"`{s.get('encoder_id')}`, SERVING {s.get('start_to_serving_s')} s after start, "
        f"exit code after SIGTERM: {s.get('exit_code')}.", "",
    ]
    for case in summary.get("cases", []):
        lines += [f"## Query `{case['query']}` (planted: {case['true_name']}, "
                  f"on the {case['planted_region']})", "",
                  f"Match report: [{case['report']}]({case['report']}).", "",
                  "| rank | syndrome | OMIM (synthetic) | best cosine | confidence |",
                  "|---|---|---|---|---|"]
        for r in case["syndromes"]:
            conf = "not calibrated" if r["confidence"] is None else f"{100 * r['confidence']:.0f} %"
            lines.append(f"| {r['rank']} | {r['name']} | {r['omim']} | {r['cosine']:+.3f} "
                         f"| {conf} |")
        lines += ["", "Explained matches (figures: query left, gallery right):", ""]
        for m in case["explained"]:
            lines.append(f"- top {m['rank']}: {m['syndrome']}, subject {m['subject']}, cosine "
                         f"{m['cosine']:+.3f}. {m['words']}. "
                         + ", ".join(f"[{k}]({v})" for k, v in m["overlays"].items()))
        lines.append("")
    lines += ["The demo's server has exited. To call the service from your own script, "
              "run `make serve`: it serves frozen SFace (not this demo's syndrome head) on "
              "the synthetic gallery of all 11 people who are not held out, from "
              "`data/galleries/default.sqlite` on `127.0.0.1:50051`; then:", "",
              "```python",
              "from phenolens import Client",
              "with Client('127.0.0.1:50051') as pl:",
              "    result = pl.explain('demo-output/queries/grace_hopper_wide_eyes.png', "
              "aligned=True, top_k=3)",
              "    result.explanations[0].save_overlay('top1.png')", "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "demo-output")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--build-gallery", type=Path, metavar="PATH",
                        help="only write the synthetic gallery into PATH (no server)")
    parser.add_argument("--if-empty", action="store_true",
                        help="with --build-gallery: leave a gallery that has faces as it is")
    parser.add_argument("--queries", type=Path, metavar="DIR",
                        help="only write the held-out query faces into DIR")
    args = parser.parse_args(argv)
    if args.build_gallery or args.queries:
        if args.build_gallery and args.if_empty and _has_faces(args.build_gallery):
            print(f"{args.build_gallery} already has faces: left as it is")
        elif args.build_gallery:
            n = build_gallery(args.build_gallery, args.seed)
            print(f"wrote {n} synthetic gallery faces into {args.build_gallery}")
        if args.queries:
            paths = write_queries(make_cohort(args.seed), args.queries)
            print(f"wrote {len(paths)} held-out query faces into {args.queries}")
        return 0
    print(DISCLAIMER)
    started = time.monotonic()
    summary = run(args.out, args.seed)
    h = summary["held_out"]
    print(f"served: {encoder_words(summary)}; held out: top-1 {h['macro_top1']:.2f}, top-3 "
          f"{h['macro_top3']:.2f}, leans on the planted region: "
          f"{h['leans_on_planted']}/{h['queries']}")
    for case in summary["cases"]:
        top = case["syndromes"][0]
        leans = case["top_match_leans_on"] or "not measured"
        print(f"{case['query']}: top syndrome {top['name']} (confidence "
              f"{case['top_syndrome_confidence']}); top match leans most on: {leans}; "
              f"planted: {case['true_name']} on the {case['planted_region']}")
    print(f"demo took {time.monotonic() - started:.0f} s; wrote {args.out / 'summary.md'} and "
          f"{len(list((args.out / 'overlays').glob('*.png')))} overlays")
    print(f"open the match report: {args.out / summary['cases'][0]['report']}")
    return 0 if summary["server"].get("exit_code") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
