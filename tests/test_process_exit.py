"""A process started for one alignkit command keeps the garbage collector off the imported stack and skips the
interpreter's final collections over it (alignkit.errors.skip_final_collections); an in-process call leaves the
collector of its caller alone."""

import gc
import subprocess
import sys

from conftest import REPO

from alignkit.errors import ConfigError, run_cli

_ENTRY = """
import atexit, gc, sys
from alignkit.errors import ConfigError, run_cli
kept = []
def collected(obj):  # still in a generation the collector walks (gc.freeze moves objects out of them)
    return any(o is obj for o in gc.get_objects())
def main(argv):
    kept.append({"made by the run": []})  # alive at exit
    print("imports collected:", collected(sys.modules["alignkit.errors"].__dict__), file=sys.stderr)
    raise ConfigError("bad key. Fix: remove it")
atexit.register(lambda: print("run's objects collected at exit:", collected(kept[0]), file=sys.stderr))
sys.argv = ["alignkit-test"]
run_cli(main)
"""


def test_a_process_entry_freezes_what_is_alive_and_again_at_exit():
    done = subprocess.run([sys.executable, "-c", _ENTRY], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "alignkit: ConfigError: bad key. Fix: remove it" in done.stderr and "Traceback" not in done.stderr
    # run_cli froze the imports before main ran; an atexit hook registered before run_cli runs after its own
    assert "imports collected: False" in done.stderr and "run's objects collected at exit: False" in done.stderr


def test_an_in_process_call_leaves_the_collector_alone(capsys):
    made = []

    def main(argv):
        made.append({"made by the call": []})
        raise ConfigError(f"{argv[0]}: bad. Fix: another")

    try:
        run_cli(main, ["x"])
    except SystemExit as exit_:
        assert exit_.code == 2
    assert any(o is made[0] for o in gc.get_objects())  # not frozen: collected as usual
    assert "alignkit: ConfigError: x: bad. Fix: another" in capsys.readouterr().err
