"""One self-contained HTML page of a match, for a clinician to open and keep.

``render_report(result, query_photo)`` turns an ExplainResult into HTML: the query
photo with its detected face, the syndrome and gene rankings with calibrated
confidence, and per explained match the pair figure of the first explanation
method sent (the server's default unless the caller chose), the region summary
in words and the cosine; a short "how to read this page". Images are inlined as
``data:`` URIs, the styles are inline, there is no script and no link to fetch,
so the file reads the same offline and in ten years. The page is a Jinja2 template
with HTML autoescaping (``PAGE``): nothing a gallery or a caller sends becomes
markup. It shows nothing about the patient beyond the photo and the ``title`` the
caller passes: gallery faces are named by the gallery's own labels (syndrome,
subject and image id). Needs Pillow and Jinja2 (``phenolens[images]``).
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import io

import numpy as np

from .arrays import require_pillow
from .results import ExplainedMatch, ExplainResult, FaceAlignment

PHOTO_MAX_SIDE = 560

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:0;
  color:#1b1b1b;background:#fafafa;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:16px 20px 40px;box-sizing:border-box}
h1{font-size:1.5rem;margin:.4em 0 .1em}h2{font-size:1.2rem;margin:1.4em 0 .4em;
  border-bottom:1px solid #ddd;padding-bottom:.2em}h3{font-size:1.05rem;margin:.8em 0 .3em}
.meta{color:#555;font-size:.85rem}
.note{background:#fff6e0;border:1px solid #e8c66a;padding:8px 12px;border-radius:4px;
  font-size:.9rem}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:0;max-width:100%}figcaption{font-size:.8rem;color:#555}
img{max-width:100%;height:auto;display:block}
img.crop{width:224px;image-rendering:auto}
table{border-collapse:collapse;width:100%;font-size:.9rem;background:#fff}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top;
  overflow-wrap:anywhere}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums;
  white-space:nowrap}
.match{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;
  margin:12px 0}
.match .words{font-size:.95rem;flex:1 1 280px;min-width:0}
figure.pair{flex:0 1 600px}
.muted{color:#777}
.warn{color:#b00020}
"""


def _data_uri(rgb: np.ndarray, fmt: str = "PNG") -> str:
    Image = require_pillow()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format=fmt)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def photo_with_face(photo: np.ndarray, alignment: FaceAlignment | None,
                    max_side: int = PHOTO_MAX_SIDE) -> np.ndarray:
    """(H, W, 3) photo, downscaled to ``max_side``, with the used face's box and landmarks."""
    Image = require_pillow()
    from PIL import ImageDraw

    im = Image.fromarray(np.ascontiguousarray(photo[..., :3], dtype=np.uint8))
    scale = min(1.0, max_side / max(im.size))
    if scale < 1.0:
        im = im.resize((round(im.width * scale), round(im.height * scale)),
                       Image.Resampling.LANCZOS)
    if alignment is not None and alignment.detected and len(alignment.boxes):
        draw = ImageDraw.Draw(im)
        width = max(2, round(max(im.size) / 200))
        box = alignment.boxes[0] * scale
        draw.rectangle([float(v) for v in box], outline=(255, 200, 0), width=width)
        if alignment.landmarks_photo is not None:
            r = width + 1
            for x, y in alignment.landmarks_photo * scale:
                draw.ellipse([x - r, y - r, x + r, y + r], fill=(0, 200, 255))
    return np.asarray(im)


def _reliability(result: ExplainResult) -> str:
    """One sentence on the calibration behind the confidences (the first calibrated one)."""
    for c in [s.confidence for s in result.match.syndromes] + [h.confidence for h in
                                                               result.match.hits]:
        if c.probability is not None:
            article = "an" if c.method[:1] in "aeiou" else "a"
            return (f"Confidence is calibrated on this gallery (version {c.gallery_version}) "
                    f"by {article} {c.method} fit to {c.samples:,} leave-one-subject-out scores; its "
                    f"expected calibration error is {100 * c.calibration_error:.1f} percentage "
                    "points.")
    reasons = {c.reason for c in [s.confidence for s in result.match.syndromes] if c.reason}
    return ("No confidence could be calibrated: " + "; ".join(sorted(reasons))[:400]
            + "." if reasons else "The server sent no calibrated confidence.")


def _pair_figure(e: ExplainedMatch, method: str) -> bytes | np.ndarray:
    """The server's pair figure of ``method``, else the client's own side-by-side overlays."""
    m = e.map(method, "query")
    if m.pair_figure_png:
        return m.pair_figure_png
    return e.overlay_pair(method, alpha=0.6)


def gallery_name(e: ExplainedMatch) -> str:
    """How the gallery names the matched face: subject and image id (the gallery's own
    labels), never the opaque row id alone."""
    r = e.hit.record
    parts = [f"subject {r.subject_id}" if r.subject_id else "",
             f"image {r.image_id}" if r.image_id else ""]
    named = ", ".join(p for p in parts if p)
    return named or f"gallery record {e.hit.gallery_id}"


def _effects(e: ExplainedMatch, side: str):
    """The region effects of one side (``FaceEffects``), when the server sent them."""
    effects_of = getattr(e, "effects_of", None)
    return effects_of(side) if callable(effects_of) else None


def side_words(e: ExplainedMatch, method: str) -> list[tuple[str, str]]:
    """(who, words) lines for a match: per face from the region effects when the server sent
    them; else from the maps, naming one line for both faces where the map is the same on
    both (contrast) and per face what pulls them together (the similarity map)."""
    lines = []
    for side, who in (("query", "Query face"), ("gallery", "Gallery face")):
        fx = _effects(e, side)
        if fx is not None:
            lines.append((who, fx.describe()))
    if lines:
        return lines
    q, g = e.map(method, "query"), e.map(method, "gallery")
    if q.regions or g.regions:
        qd, gd = q.describe_regions("negative"), g.describe_regions("negative")
        if qd == gd:
            lines.append(("Both faces (one map, drawn on both)", qd))
        else:
            lines += [("Query face", qd), ("Gallery face", gd)]
    alike = "similarity" if "similarity" in e.methods else method
    for side, who in (("query", "Query face"), ("gallery", "Gallery face")):
        m = e.map(alike, side)
        if m.regions and m.ranked_regions("positive"):
            lines.append((who, m.describe_regions("positive")))
    return lines


OUTSIDE_SHARE = 0.5  # of the similarity's "pulls together" mass outside the named regions


def leans_on_outside(e: ExplainedMatch) -> str:
    """A sentence when the match leans on hair or background, else ""."""
    flagged = []
    for side in ("query", "gallery"):
        fx = _effects(e, side)
        if fx is not None and fx.leans_on_outside():
            flagged.append(side)
    if any(_effects(e, side) is not None for side in ("query", "gallery")):
        if not flagged:
            return ""
        return ("This match leans on hair or background: replacing what lies outside the "
                f"{' and '.join(f'{s} face' for s in flagged)} with an average face's is among "
                "the two edits that cost the similarity most. Read it with care, it may not "
                "be about the face.")
    if "similarity" not in e.methods:
        return ""
    outside = [1.0 - sum(r.positive for r in e.map("similarity", side).regions)
               for side in ("query", "gallery") if e.map("similarity", side).regions]
    if outside and max(outside) >= OUTSIDE_SHARE:
        return (f"{100 * max(outside):.0f} % of what pulls these faces together lies outside "
                "the named facial regions (hair, background or the face's edge): read this "
                "match with care, it may not be about the face.")
    return ""


def is_synthetic(match) -> bool:
    """The gallery's labels say its syndromes are synthetic (``research.synth``: names that
    start with "synthetic", OMIM-style numbers that start with "SYN-", or a synthetic source)."""
    return any(s.syndrome_name.lower().startswith("synthetic") or s.omim.startswith("SYN-")
               for s in match.syndromes) or any(h.record.source.startswith("synthetic")
                                                 for h in match.hits)


def _match_context(e: ExplainedMatch, method: str) -> dict:
    h = e.hit
    figure = _pair_figure(e, method)
    return {"rank": h.rank, "name": h.record.syndrome_name or h.syndrome_id,
            "gallery_name": gallery_name(e), "cosine": h.cosine, "confidence": h.confidence,
            "src": _png_uri(figure) if isinstance(figure, bytes) else _data_uri(figure),
            "words": side_words(e, method), "warning": leans_on_outside(e),
            "first_order": getattr(e, "first_order", None)}


def render_report(result: ExplainResult, query_photo: np.ndarray | None = None, *,
                  title: str = "", method: str | None = None, top_syndromes: int = 10,
                  top_genes: int = 10, generated: _dt.datetime | None = None) -> str:
    """The HTML page (a str) of an explained match.

    Args:
        result: ``Client.explain(...)`` (or ``Client.report``'s) result; its explanations
            should carry gallery crops or pair figures.
        query_photo: (H, W, 3) uint8 photo as submitted; None leaves the photo out.
        title: shown as given (e.g. a case number the caller chooses); nothing else
            about the patient is written.
        method: the explanation drawn; default the first one sent (the server's default).
    """
    match = result.match
    generated = generated or _dt.datetime.now(_dt.timezone.utc)  # noqa: UP017 - 3.10
    shown = match.syndromes[:top_syndromes]
    refused = {s.confidence.reason for s in shown
               if s.confidence.probability is None and s.confidence.reason}
    photo = None
    if query_photo is not None and (match.alignment is None or match.alignment.detected):
        photo = _data_uri(photo_with_face(query_photo, match.alignment), "JPEG")
    method = (method or result.explanations[0].methods[0]) if result.explanations else None
    page = _template().render(
        title=title, generated=generated, match=match, synthetic=is_synthetic(match),
        photo=photo, crop=_png_uri(result.query_crop_png) if result.query_crop_png else None,
        reliability=_reliability(result), syndromes=shown,
        omim=any(s.omim for s in shown),  # an empty column is left out
        refused="; ".join(sorted(refused))[:600]
        if refused and any(s.confidence.calibrated for s in match.syndromes) else "",
        genes=match.genes[:top_genes], method=method, style=_STYLE,
        matches=[_match_context(e, method) for e in result.explanations])
    return page.replace(" %", "\u00a0%")  # "48 %" never breaks


@functools.lru_cache(maxsize=1)
def _template():
    """The page's Jinja2 template, HTML-autoescaped (every value the gallery or the caller
    gives is text, never markup)."""
    try:
        import jinja2
    except ImportError as exc:  # pragma: no cover - the images extra installs it
        raise ImportError("the match report needs Jinja2: pip install "
                          "'phenolens[images]'") from exc
    env = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    return env.from_string(PAGE)

HOW_TO_READ = """
<h2 id="how-to-read">How to read this page</h2>
<ul>
<li><b>Cosine</b> compares two faces in the model's face space: 1 is the same direction,
0 unrelated. Its scale differs between models and galleries, so read it next to the
confidence.</li>
<li><b>Confidence</b> is the probability that the query shares a syndrome, calibrated on
this gallery: every gallery face was matched against the others with its own patient left
out, and a monotone map from cosine to "same syndrome" was fitted to those outcomes. It is
not given ("not calibrated") for syndromes with too few patients in the gallery; hover over
the words for the reason. It assumes the query's syndrome is one of the gallery's.</li>
<li>A gene's confidence is the same for the genes the gallery faces carry: the
probability that the query carries it, read from its nearest carrier's cosine.</li>
<li>A syndrome's rank is that of its nearest gallery face (as GestaltMatcher ranks). Its
confidence reads that nearest cosine against how the best cosine of the right and of the
wrong syndromes fell in the gallery; a single match's "chance that these two faces share a
syndrome" reads one pair's cosine against all pairs, so the two numbers differ.</li>
<li><b>Maps</b>: the <i>contrast</i> map (blue) marks where the two faces differ; the
<i>similarity</i> map is red where a region pulls the faces together and blue where it pushes
them apart. One colour scale serves both faces of a pair; pale means little effect. The legend
under each figure names only the colours the figure can show.</li>
<li><b>Words</b>: with region effects, "differs most: eyes (+0.12)" means the similarity
would rise by 0.12 if this face had the other face's eyes, and "alike most: nose (−0.05)"
that it would drop by 0.05 if this face's nose were an average face's: the match leans on
it. Without them the words name the landmark regions (eyes, brows, nasal bridge, nose,
mouth, chin, cheeks, forehead) holding the largest shares of the map. A match that leans
on hair or background is flagged in red.</li>
<li>The maps explain the model's similarity score, not a clinical finding.</li>
</ul>
"""


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>PhenoLens match report{% if title %} - {{ title }}{% endif %}</title>
<style>{{ style | safe }}</style></head><body><main>
{% macro confidence(c) %}{% if c.probability is none %}<span class="muted" \
title="{{ c.reason }}">not calibrated</span>{% else %}{{ c.describe() }}{% endif %}{% endmacro %}
<h1>PhenoLens match report{% if title %}: {{ title }}{% endif %}</h1>
<p class="meta">Generated {{ generated.strftime("%Y-%m-%d %H:%M") }} UTC · encoder \
{{ match.encoder_id }} · views {{ match.view_scheme }} · gallery version \
{{ match.gallery_version }}</p>
<p class="note">Decision support, not a diagnosis: the page says how this face compares with \
the faces in one gallery. Syndromes that are absent from the gallery cannot appear.</p>
{% if synthetic %}
<p class="note" id="synthetic">The syndromes in this gallery are synthetic: smooth \
deformations planted on photos of ordinary adults, with made-up OMIM-style numbers and gene \
symbols. Nothing here is about a real syndrome or a real patient.</p>
{% endif %}
{% if photo or crop %}
<h2>Query</h2>
<div class="row">
{% if photo %}<figure><img id="query-photo" src="{{ photo }}" alt="query photo with the \
detected face"><figcaption>Query photo; the box and dots mark the face and landmarks used.\
</figcaption></figure>{% endif %}
{% if crop %}<figure><img class="crop" src="{{ crop }}" alt="aligned query face">\
<figcaption>The aligned face the model compares</figcaption></figure>{% endif %}
</div>
{% endif %}
<h2>Syndromes</h2>
<p>{{ reliability }}</p>
<table id=syndromes><tr><th>rank</th><th>syndrome</th>{% if omim %}<th>OMIM</th>{% endif %}\
<th>best cosine</th><th>confidence</th></tr>
{% for s in syndromes %}
<tr><td class=num>{{ s.rank }}</td><td>{{ s.syndrome_name or s.syndrome_id }}</td>\
{% if omim %}<td>{{ s.omim }}</td>{% endif %}<td class=num>{{ "%+.3f" % s.cosine }}</td>\
<td class=num>{{ confidence(s.confidence) }}</td></tr>
{% endfor %}
</table>
{% if refused %}<p class="muted">Not calibrated: {{ refused }}.</p>{% endif %}
{% if genes %}
<h2>Genes</h2>
<table id=genes><tr><th>rank</th><th>gene</th><th>best cosine</th><th>confidence</th></tr>
{% for g in genes %}
<tr><td class=num>{{ g.rank }}</td><td>{{ g.gene }}</td>\
<td class=num>{{ "%+.3f" % g.cosine }}</td><td class=num>{{ confidence(g.confidence) }}</td></tr>
{% endfor %}
</table>
{% endif %}
{% if matches %}
<h2>Top matches, explained</h2>
{% for m in matches %}
<section class="match" id="match-{{ m.rank }}">
<h3>Match {{ m.rank }}: {{ m.name }} <span class="muted">({{ m.gallery_name }})</span></h3>
<p>Cosine similarity <b>{{ "%+.3f" % m.cosine }}</b> · chance that these two faces share a \
syndrome: <b>{{ confidence(m.confidence) }}</b> · explanation: {{ method }}</p>
<div class="row"><figure class="pair"><img src="{{ m.src }}" alt="pair figure of match \
{{ m.rank }}: query and gallery faces with their {{ method }} maps"><figcaption>Top: the query \
face and the matched gallery face. Bottom: the same faces with the {{ method }} map; the legend \
under the figure says what its colours mean.</figcaption></figure>
<ul class="words">
{% for who, text in m.words %}<li><b>{{ who }}:</b> {{ text }}.</li>{% endfor %}
{% if m.warning %}<li class="warn">{{ m.warning }}</li>{% endif %}
{% if m.first_order is not none %}<li class="muted">The {{ method }} map accounts for \
{{ "%.0f" % (100 * m.first_order) }} % of the similarity lost against a perfect match.</li>\
{% endif %}
</ul></div>
</section>
{% endfor %}
{% endif %}
""" + HOW_TO_READ + """
</main></body></html>
"""



