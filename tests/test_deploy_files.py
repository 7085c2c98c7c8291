"""deploy/: the systemd units are valid units whose commands are real `songpipe` commands, and the
example environment files set only variables songpipe reads.
"""
from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.settings import Settings
from tests.stack_fixtures import REPO_ROOT

SYSTEMD = REPO_ROOT / "deploy" / "systemd"
ENV_EXAMPLES = REPO_ROOT / "deploy" / "env"
INSTALLED_SONGPIPE = "/opt/songpipe/venv/bin/songpipe"  # where deploy/README.md installs it
UNITS = sorted(SYSTEMD.glob("*.service"))
# read by libraries or the units themselves, not by Settings
EXTERNAL_VARIABLES = {"PROMETHEUS_MULTIPROC_DIR", "CUDA_VISIBLE_DEVICES", "SONGPIPE_WEB_HOST", "SONGPIPE_WEB_PORT",
                      "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of a unit file, repeated keys kept (configparser would merge them)."""
    entries, section = [], ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def settings_variables() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names.add(alias if isinstance(alias, str) else f"SONGPIPE_{name.upper()}")
    return names


def test_there_is_a_unit_for_every_long_running_process():
    commands = {" ".join(shlex.split(value)[1:]) for unit in UNITS
                for section, key, value in unit_entries(unit) if key == "ExecStart"}
    for expected in ("worker cpu", "worker gpu", "reconcile", "db upgrade"):
        assert expected in commands
    assert any(command.startswith("web ") for command in commands)


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_exec_start_is_a_songpipe_command_that_accepts_its_arguments(unit):
    entries = unit_entries(unit)
    environment = dict(value.split("=", 1) for section, key, value in entries if key == "Environment")
    exec_starts = [value for section, key, value in entries if key == "ExecStart"]
    assert len(exec_starts) == 1
    argv = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: environment[m.group(1)], exec_starts[0]))
    assert argv[0] == INSTALLED_SONGPIPE
    # --help after the arguments: click parses (and validates) them, then prints the help
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", *argv[1:], "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_units_read_the_shared_environment_file(unit):
    files = [value for section, key, value in unit_entries(unit) if key == "EnvironmentFile"]
    assert "/etc/songpipe/songpipe.env" in files


def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    songpipe = Path(sys.executable).with_name("songpipe")
    assert songpipe.exists(), "the songpipe console script of this environment"
    for path in [*UNITS, *SYSTEMD.glob("*.target")]:
        text = path.read_text().replace(INSTALLED_SONGPIPE, str(songpipe))
        # the service user and the /etc files exist only on an installed host
        text = re.sub(r"^(User|Group)=.*$", r"\1=root", text, flags=re.MULTILINE)
        text = re.sub(r"^EnvironmentFile=/", "EnvironmentFile=-/", text, flags=re.MULTILINE)
        (tmp_path / path.name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # unknown keys and bad values are only warnings: none may mention our units
    complaints = [line for line in result.stderr.splitlines() if str(tmp_path) in line or "songpipe" in line]
    assert complaints == []


@pytest.mark.parametrize("example", sorted(ENV_EXAMPLES.glob("*.env.example")), ids=lambda p: p.name)
def test_example_environment_files_set_only_variables_songpipe_reads(example):
    known = settings_variables() | EXTERNAL_VARIABLES
    keys = [line.split("=", 1)[0] for line in example.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert keys, f"{example.name} sets nothing"
    assert [key for key in keys if key not in known] == []


def test_the_unit_files_parse_as_ini():
    for unit in UNITS:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.read_string(unit.read_text())
        assert {"Unit", "Service"} <= set(parser.sections()), unit.name


def _compose_services() -> dict:
    import yaml

    return yaml.safe_load((REPO_ROOT / "deploy" / "compose.yaml").read_text())["services"]


def test_compose_runs_every_role_from_the_songpipe_image():
    services = _compose_services()
    commands = {" ".join(s["command"]) for s in services.values() if s.get("image") == "songpipe:latest"}
    assert {"db upgrade", "reconcile", "worker cpu", "worker gpu"} <= commands
    assert any(command.startswith("web ") for command in commands)
    # each worker has its own metrics port
    ports = [s["environment"]["SONGPIPE_METRICS_PORT"] for s in services.values()
             if "SONGPIPE_METRICS_PORT" in s.get("environment", {})]
    assert len(ports) == len(set(ports)) == 2


@pytest.mark.parametrize("name", sorted(n for n, s in _compose_services().items() if s.get("image") == "songpipe:latest"))
def test_compose_commands_are_songpipe_commands(name):
    service = _compose_services()[name]
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", *service["command"], "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    known = settings_variables() | EXTERNAL_VARIABLES
    assert [key for key in service["environment"] if key not in known] == []
