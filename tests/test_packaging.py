"""A wheel built from the git-tracked files alone carries the migrations and runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def test_wheel_from_tracked_files_ships_the_migrations(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    source = tmp_path / "source"
    for name in filter(None, tracked):
        target = source / name
        if (ROOT / name).is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        timeout=300,
    )
    [wheel] = (tmp_path / "dist").glob("model_registry-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300
    )
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "from registry.migrations import load_migrations, migrations_dir;"
            "print(migrations_dir()); print(len(load_migrations()))",
        ],
        env={"PYTHONPATH": str(site)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    directory, count = probe.stdout.split()
    assert Path(directory) == site / "registry" / "sql"
    assert int(count) == len(list((ROOT / "sql").glob("*.sql")))
    [entry_points] = site.glob("model_registry-*.dist-info/entry_points.txt")
    assert "model-registry = registry.cli:main" in entry_points.read_text()
