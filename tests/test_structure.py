"""The shape of the house: the core imports no feature, and keys.py imports nothing of ours."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CORE = [
    "registry.config",
    "registry.model",
    "registry.reservation",
    "registry.capacity",
    "registry.view",
    "registry.database",
    "registry.migrations",
    "registry.errors",
    "registry.logs",
    "registry.schemas",
    "registry.metrics",
]
FEATURES = (
    "catalog",
    "admission",
    "instances",
    "footprints",
    "watch",
    "fleet",
    "ops_view",
    "guard",
    "backup",
)


def _loaded_after_importing(module: str) -> list[str]:
    """Our modules a fresh interpreter holds after importing `module`."""
    ours = "m.split('.')[0] in ('registry', 'gpu')"
    code = (
        f"import sys, json, {module}; print(json.dumps(sorted(m for m in sys.modules if {ours})))"
    )
    loaded: list[str] = json.loads(subprocess.check_output([sys.executable, "-c", code]))
    return loaded


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_no_feature_package(module: str) -> None:
    features = [
        m for m in _loaded_after_importing(module) if m.split(".")[1:2] in [[f] for f in FEATURES]
    ]
    assert features == [], f"{module} pulls in {features}"


def test_keys_import_no_project_module_at_run_time() -> None:
    assert _loaded_after_importing("registry.keys") == ["registry", "registry.keys"]


ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_stays_short_and_its_layout_names_every_package() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 10_000
    packages = [
        p.parent.relative_to(ROOT).as_posix()
        for top in ("registry", "gpu")
        for p in (ROOT / top).glob("**/__init__.py")
    ]
    assert "registry/catalog" in packages and "gpu" in packages
    for package in packages:
        if package != "registry":
            assert f"`{package}/`" in readme, package
