"""The shipped unit: Type=notify, watchdog, DynamicUser, and hardened to exposure <= 2.0."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from registry.config import Settings

SYSTEMD = Path(__file__).parent.parent / "systemd"
UNIT = SYSTEMD / "model-registry.service"


def _settings_of(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_unit_declares_what_the_service_needs() -> None:
    unit = _settings_of(UNIT.read_text())
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "Restart": ["always"],
        "DynamicUser": ["yes"],
        "StateDirectory": ["model-registry"],
        "EnvironmentFile": ["-/etc/model-registry/env"],
        "MemoryDenyWriteExecute": ["no"],
        # SIGTERM to the daemon alone: it stops its embedded PostgreSQL after itself.
        "KillMode": ["mixed"],
    }
    for key, value in expected.items():
        assert unit.get(key) == value, key
    assert unit["WatchdogSec"]
    assert unit["LimitNOFILE"] == ["65536"]
    assert "PrivateDevices" not in unit or unit["PrivateDevices"] == ["no"]
    allowed = " ".join(unit["DeviceAllow"])
    for device in ("/dev/nvidiactl", "/dev/nvidia-uvm", "char-nvidia-frontend"):
        assert device in allowed
    # Exit 2 (bad configuration) and 3 (a database it refuses) are not restarted in a loop.
    assert unit["RestartPreventExitStatus"] == ["2 3"]


def test_the_unit_reads_a_config_file_that_a_reload_copies_in_again() -> None:
    unit = _settings_of(UNIT.read_text())
    copy = "+/usr/bin/install -m 0444 /etc/model-registry/config.toml %t/model-registry/config.toml"
    assert unit["ExecStartPre"] == [copy]
    assert unit["ExecStart"] == [
        "/opt/model-registry/bin/model-registry serve --config %t/model-registry/config.toml"
    ]
    assert unit["ExecReload"] == [copy, "/bin/kill -HUP $MAINPID"]
    assert unit["RuntimeDirectoryMode"] == ["0700"]  # the copy is the service's alone


def test_the_config_example_lists_every_live_setting_and_loads(tmp_path: Path) -> None:
    from registry.config import LIVE_SETTINGS, load_settings

    example = (SYSTEMD / "config.toml.example").read_text()
    keys = re.findall(r"^#(\w+) = ", example, re.MULTILINE)
    assert sorted(keys) == sorted(LIVE_SETTINGS)
    assert load_settings(_write(tmp_path / "as-shipped.toml", example)).poll_interval == 1.0
    uncommented = re.sub(r"^#(\w+ = )", r"\1", example, flags=re.MULTILINE)
    uncommented = uncommented.replace('""', '"a-token-of-sixteen-chars"')
    settings = load_settings(_write(tmp_path / "uncommented.toml", uncommented))
    assert settings.admin_tokens() == ["a-token-of-sixteen-chars"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_env_example_documents_every_setting() -> None:
    example = (SYSTEMD / "model-registry.env.example").read_text()
    for name in Settings.model_fields:
        assert f"MODEL_REGISTRY_{name.upper()}=" in example, name


def test_the_configuration_guide_has_a_row_for_each_setting_and_no_other() -> None:
    guide = (SYSTEMD.parent / "docs" / "configuration.md").read_text()
    rows = re.findall(r"^\| `(MODEL_REGISTRY_[A-Z_]+)` \|", guide, re.MULTILINE)
    assert sorted(rows) == sorted(
        f"MODEL_REGISTRY_{name.upper()}" for name in Settings.model_fields
    )


@pytest.fixture
def installed_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's console script."""
    script = Path(sys.executable).parent / "model-registry"
    unit = tmp_path / "model-registry.service"
    unit.write_text(UNIT.read_text().replace("/opt/model-registry/bin/model-registry", str(script)))
    return unit


def test_hardening_exposure_is_at_most_2(installed_unit: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", str(installed_unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0
    assert result.returncode == 0


def test_unit_verifies(installed_unit: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(installed_unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
