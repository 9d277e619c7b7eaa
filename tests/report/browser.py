"""Headless Chromium for the report tests: a screenshot, and a probe of the rendered page.

The report itself has no script. The probe runs on a copy of it with one script
appended, which, after the load event, writes what it measured into the DOM;
``--dump-dom`` then prints that DOM. Requests to any host fail (``MAP * ~NOTFOUND``),
so a page that needed the network would show it as broken images.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
WIDTH = 1280

_PROBE = """
<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                     .map(function (i) { return i.alt || i.src.slice(0, 40); });
  var target = %(target)s, visible = false;
  var walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    var node = walker.currentNode;
    if (node.textContent.indexOf(target) < 0) continue;
    var el = node.parentElement, r = el.getBoundingClientRect(), cs = getComputedStyle(el);
    if (r.width > 0 && r.height > 0 && cs.visibility === "visible" && cs.display !== "none"
        && parseFloat(cs.opacity) > 0 && r.left >= 0 && r.right <= window.innerWidth) {
      visible = true; break;
    }
  }
  var out = {images: images.length, broken: broken, target_visible: visible,
             scroll_width: document.documentElement.scrollWidth, inner_width: window.innerWidth};
  var pre = document.createElement("pre");
  pre.id = "probe-result";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


@dataclass(frozen=True)
class PageProbe:
    images: int
    broken: tuple[str, ...]
    target_visible: bool
    scroll_width: int
    inner_width: int


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def _run(chromium: str, args: list[str], profile: Path, timeout: float = 120) -> str:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
           '--host-resolver-rules=MAP * ~NOTFOUND', *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    return done.stdout


def probe(chromium: str, page: Path, target_text: str) -> PageProbe:
    """Load ``page`` at 1280 px width and measure images, ``target_text`` and the width."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "probe.html"
        text = page.read_text(encoding="utf-8")
        script = _PROBE % {"target": json.dumps(target_text)}
        copy.write_text(text.replace("</body>", script + "</body>"), encoding="utf-8")
        dom = _run(chromium, [f"--window-size={WIDTH},900", "--virtual-time-budget=10000",
                              "--dump-dom", copy.as_uri()], Path(tmp) / "profile")
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', dom, re.S)
    if found is None:
        raise AssertionError("the probe did not run: the page never finished loading")
    data = json.loads(html.unescape(found.group(1)))
    return PageProbe(data["images"], tuple(data["broken"]), data["target_visible"],
                     data["scroll_width"], data["inner_width"])


def screenshot(chromium: str, page: Path, out: Path, height: int = 2400) -> Path:
    """A PNG of the page's first ``height`` pixels at 1280 px width."""
    with tempfile.TemporaryDirectory() as tmp:
        _run(chromium, [f"--window-size={WIDTH},{height}", "--hide-scrollbars",
                        "--virtual-time-budget=10000", f"--screenshot={out}", page.as_uri()],
             Path(tmp) / "profile")
    return out
