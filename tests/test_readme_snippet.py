"""The README's "call the service from your own script" snippet runs as written.

Against ``make serve``'s configuration (the defaults of ``phenolens serve``: no tokens,
the default encoder and view scheme; only the port and the gallery file are the test's),
in the order a new user meets it: the server starts on an empty gallery (announced at
startup; the snippet runs, finds nothing, says so and does not crash), then another
process fills the gallery file the way ``make serve`` does (``python -m server.demo
--build-gallery PATH --if-empty``) and the running server, not restarted, answers the
same snippet with syndromes, an overlay and a report.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Call the service from your own script"
MAKE_SERVE_ADDRESS = "127.0.0.1:50051"


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert SECTION in text, f"the README lost its section {SECTION!r}"
    block = re.search(r"```python\n(.*?)```", text[text.index(SECTION):], re.S)
    assert block, "no python block in the README's snippet section"
    return block.group(1)


def test_the_make_serve_target_fills_the_default_gallery_the_snippet_uses():
    makefile = (REPO / "Makefile").read_text()
    serve = makefile[makefile.index("\nserve:"):].split("\n\n")[0]
    assert "server.demo --build-gallery data/galleries/default.sqlite --if-empty" in serve
    assert "phenolens serve\n" in serve + "\n"
    snippet = readme_snippet()
    assert MAKE_SERVE_ADDRESS in snippet, "the snippet talks to make serve's address"
    for path in re.findall(r'"(data/[^"]+)"', snippet):
        assert (REPO / path).exists(), f"the snippet names {path}, which setup does not fetch"


@pytest.fixture(scope="module")
def served(tmp_path_factory, caplog_module):
    from server.app import start
    from server.config import load_config

    tmp = tmp_path_factory.mktemp("readme")
    gallery = tmp / "default.sqlite"
    config = load_config(None, env={}, listen="127.0.0.1:0", gallery={"path": str(gallery)})
    assert not config.auth.tokens, "make serve runs without tokens"
    running = start(config)
    yield running, gallery, tmp
    running.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def caplog_module():
    """Records of the 'phenolens' loggers while the module's server runs."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.WARNING)
    logger = logging.getLogger("phenolens")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def run_snippet(address: str, cwd: Path) -> subprocess.CompletedProcess:
    code = readme_snippet().replace(MAKE_SERVE_ADDRESS, address)
    (cwd / "data").exists() or (cwd / "data").symlink_to(REPO / "data")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_the_snippet_runs_on_an_empty_gallery_then_on_one_another_process_fills(
        served, caplog_module):
    running, gallery, tmp = served
    assert any("gallery is empty" in r.getMessage() for r in caplog_module), \
        "an empty gallery is announced at startup"

    empty = tmp / "empty"
    empty.mkdir()
    proc = run_snippet(running.address, empty)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", "nothing matched, nothing printed"
    assert "EmptyResultWarning: no gallery face matched" in proc.stderr, \
        "the client warns instead of returning a silent empty list"
    assert not (empty / "top1.png").exists()
    assert any("empty gallery" in r.getMessage() for r in caplog_module), \
        "the server says a match found an empty gallery"

    build = subprocess.run([sys.executable, "-m", "server.demo", "--build-gallery", str(gallery),
                            "--if-empty"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    assert "synthetic gallery faces" in build.stdout

    filled = tmp / "filled"
    filled.mkdir()
    proc = run_snippet(running.address, filled)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 6, proc.stdout  # three hits, three syndromes
    assert all("synthetic" in line for line in lines), "syndrome names from the gallery"
    assert any("%" in line for line in lines[3:]), "a calibrated confidence"
    assert "grace_hopper" not in proc.stdout, "the query's person is held out of the gallery"
    assert (filled / "top1.png").stat().st_size > 1000
    page = (filled / "report.html").read_text(encoding="utf-8")
    assert 'id="synthetic"' in page and "SYN-9000" in page

    again = subprocess.run([sys.executable, "-m", "server.demo", "--build-gallery", str(gallery),
                            "--if-empty"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "left as it is" in again.stdout
