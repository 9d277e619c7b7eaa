"""A process killed with SIGKILL mid-import loses no committed record and leaves no half record."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from gallery import Gallery
from tests.gallery.crash_child import BATCH, record

REPO = Path(__file__).resolve().parents[2]


def test_sigkill_mid_import_keeps_every_committed_record(tmp_path):
    path = tmp_path / "g.db"
    Gallery.open(path).close()
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.gallery.crash_child", str(path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    committed = 0
    try:
        while committed < 40 * BATCH:
            line = child.stdout.readline()
            assert line, "child exited early"
            committed = int(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL

    with Gallery.open(path) as g:
        count = len(g)
        assert count >= committed, "a committed batch was lost"
        assert count % BATCH == 0, "a batch was half written"
        assert g.version == count // BATCH
        ids = [r.image_id for r in g.list(limit=count + 10)]
        assert ids == [f"img{i}" for i in range(count)]
        for i in (0, committed - 1, count - 1):
            rec = g.get_image(f"img{i}")
            want = record(i)
            np.testing.assert_array_equal(np.stack(rec.views), np.stack(want.views))
            assert rec.crop_png == want.crop_png
            assert g.search(want.views, k=1)[0].image_id == f"img{i}", "index not rebuilt to match"
    with Gallery.open(path) as g:
        g.add_many([record(count)])
        assert len(g) == count + 1
