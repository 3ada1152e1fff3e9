"""README's commands are the ones CI and users run; keep them true."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _commands():
    block = re.search(
        r"## Two commands for a fresh machine.*?```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S
    )
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_gives_two_commands_and_ci_runs_the_test_one():
    main_job, tests = _commands()
    assert "pytest" in tests and "pytest" not in main_job
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), ".ci/run must run exactly README's test command"


def test_readme_commands_name_existing_files():
    for command in _commands():
        for path in re.findall(r"(scripts/\S+\.sh|recipes/\S+\.py)", command):
            assert (REPO / path).is_file(), path


def test_network_is_closed_to_tests():
    import socket

    import pytest

    with pytest.raises(RuntimeError, match="offline"):
        socket.create_connection(("203.0.113.1", 443), timeout=1)
