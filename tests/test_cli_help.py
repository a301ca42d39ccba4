"""Every command the README, the configs and the scripts name exists, and its --help runs
(no traceback, no markup swallowed); every script's --help runs as a process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from rtjax.cli import app

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = set(get_command(app).commands)
_MENTION = re.compile(r"(?<![\w./-])rtjax ([a-z][a-z-]*[a-z])\b")
#: Words after "rtjax " in prose that are not commands.
_PROSE = {"segments", "reads", "writes", "is", "can", "run's", "uses"}


def _mentions(path: Path) -> set[str]:
    return {m for m in _MENTION.findall(path.read_text()) if m not in _PROSE}


def _documents():
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").glob("*.md"))
    yield from sorted((ROOT / "configs").glob("*.yaml"))
    yield from sorted((ROOT / "scripts").glob("*"))
    yield from sorted((ROOT / "rtjax" / "weights").rglob("MODEL_CARD.md"))


@pytest.mark.parametrize("path", list(_documents()), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_command_exists(path):
    missing = sorted(_mentions(path) - COMMANDS)
    assert not missing, f"{path.name} names commands that do not exist: {missing}"


def test_scripts_call_existing_commands():
    for script in (ROOT / "scripts").glob("*.py"):
        for name in re.findall(r"app\(\[\"([a-z-]+)\"", script.read_text()):
            assert name in COMMANDS, f"{script.name} calls `rtjax {name}`"


def test_the_readme_names_every_command():
    readme = _mentions(ROOT / "README.md")
    assert COMMANDS <= readme, f"commands the README does not name: {sorted(COMMANDS - readme)}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_of_every_command(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "Usage:" in result.output


def test_help_shows_the_defaults_literally():
    out = " ".join(CliRunner().invoke(app, ["run", "--help"]).output.split())  # unwrap lines
    assert "[default: 15]" in out and "[default: network]" in out and "[default: 150]" in out
    assert "wm/gm[/csf]" in CliRunner().invoke(app, ["simulate", "--help"]).output


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_every_script_answers_help(script):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
