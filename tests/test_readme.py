"""README's two commands are the contract with a new user: the test command must set the
machine up by itself, not rely on CI having done it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block is not None, "README.md must open with a bash block holding the two commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands_main_job_then_tests() -> None:
    commands = _readme_commands()
    assert len(commands) == 2
    assert commands[0].rstrip().endswith("mloop demo")
    assert commands[1].rstrip().endswith("pytest")


def test_test_command_runs_the_machine_setup_before_pytest() -> None:
    test_cmd = _readme_commands()[1]
    parts = [p.strip() for p in test_cmd.split("&&")]
    assert "bash scripts/test_setup.sh" in parts
    assert parts.index("bash scripts/test_setup.sh") < parts.index("pytest")


def test_setup_script_leaves_every_service_and_tool_the_tests_need_ready() -> None:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "test_setup.sh")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    for tool in ("chromium", "promtool", "java"):
        assert shutil.which(tool), f"{tool} missing after scripts/test_setup.sh"
    ready = subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"], timeout=30)
    assert ready.returncode == 0
