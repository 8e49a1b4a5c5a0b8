"""loupe installs as one package: `loupe` in site-packages and nothing else, with its data files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from tests.conftest import REPO

FOLDERS = {"loupe": "loupe", "loupe.cli": "cli", "loupe.indexer": "indexer", "loupe.retrieval": "retrieval"}


def package_folders() -> dict[str, Path]:
    """Every Python package of the source tree, by its installed name."""
    found = {}
    for name, folder in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found[".".join([name, *rel.parts])] = init.parent
    return found


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == FOLDERS
    assert sorted(config["packages"]) == sorted(package_folders())


def test_wheel_holds_only_the_loupe_package_and_its_data(tmp_path):
    src = tmp_path / "src"  # a copy: building writes build/ and egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md", *FOLDERS.values()):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (REPO / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("loupe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"loupe"}
    for needed in ("loupe/__main__.py", "loupe/cli/main.py", "loupe/indexer/models/configs/loupe-tiny.json",
                   "loupe/retrieval/eval/published_flickr30k.json", "loupe/retrieval/web/static/index.html",
                   "loupe/retrieval/web/static/js/main.js"):
        assert needed in names


def test_python_m_loupe_runs_the_command():
    proc = subprocess.run([sys.executable, "-m", "loupe", "--help"], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert "index" in proc.stdout and "search" in proc.stdout
