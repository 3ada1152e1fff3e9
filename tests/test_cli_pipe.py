"""A reader that leaves early (``alignkit recipes | head -1``): the command exits 141, as Unix tools do on SIGPIPE,
with nothing on stderr, through the CLI's own printing (``--help``) and a command run by ``run_cli``."""

import subprocess
import sys

import pytest

from alignkit.errors import STDOUT_CLOSED


@pytest.mark.parametrize("argv", [["--help"], ["recipes"]])
def test_output_cut_off_by_its_reader_exits_quietly(argv):
    child = subprocess.Popen([sys.executable, "-m", "alignkit.cli", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)  # fmt: skip
    child.stdout.close()  # the reader leaves before the command prints
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == STDOUT_CLOSED == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_broken_pipe_elsewhere_is_not_taken_for_stdout():
    """A BrokenPipeError while stdout still writes (a pipe to a child process broke) is a real error: re-raised."""
    from alignkit.errors import run_cli

    def main(argv):
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        run_cli(main, [])
