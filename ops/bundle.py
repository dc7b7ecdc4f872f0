"""The Flower App bundle: the files `flwr run <dir>` submits to a SuperLink."""

from __future__ import annotations

import shutil
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
APP_SUFFIXES = {".py", ".toml", ".yaml", ".yml", ".json", ".md"}  # what Flower puts in an app bundle


def stage_app(target: Path) -> Path:
    """Copy the Flower App (pyproject.toml + the project's packages) to `target` and return it.

    `flwr run <dir>` walks every file under <dir> to build the app bundle; on the project root that
    includes .venv (tens of thousands of files, ~5 s) and earlier runs. The copy is also a record
    of the exact code a run used. The packages are those pyproject.toml installs, so the bundle
    holds what an installed project holds.
    """
    import tomllib  # Python 3.11+

    pyproject = PROJECT_ROOT / "pyproject.toml"
    if not pyproject.exists():
        raise FileNotFoundError(f"no pyproject.toml in {PROJECT_ROOT}: run from a source checkout "
                                "installed with `pip install -e .`")
    config = tomllib.loads(pyproject.read_text())
    patterns = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted({p.split(".")[0].rstrip("*") for p in patterns})
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copy2(pyproject, target / "pyproject.toml")
    for package in packages:
        for source in (PROJECT_ROOT / package).rglob("*"):
            if source.suffix in APP_SUFFIXES and source.is_file() and "__pycache__" not in source.parts:
                destination = target / source.relative_to(PROJECT_ROOT)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, destination)
    return target
