"""Each stage's recipe, run on the tiny model with alignkit's defaults, reproduces its pinned per-step trajectory."""

import pytest

from regression.golden import RUNS, describe_machine, load_golden, machine_facts, mismatches, trajectory

pytestmark = pytest.mark.regression


@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_trajectory_matches_golden(run, tmp_path):
    stored = load_golden()
    golden = stored["runs"].get(run.name)
    assert golden is not None, (
        f"{run.name}: no golden trajectory. Fix: python -m tests.regression.regenerate {run.name}"
    )
    assert golden.get("command") == run.command, (
        f"{run.name}: its command changed. Fix: python -m tests.regression.regenerate {run.name}"
    )
    problems = mismatches(run.name, golden["metrics"], trajectory(run, tmp_path / run.name))
    assert not problems, (
        "training no longer computes what it did (tolerances per metric: tests/regression/golden.py TOLERANCES):\n  "
        + "\n  ".join(problems)
        + f"\ngolden recorded on: {describe_machine(golden.get('machine') or stored.get('machine'))}"
        + f"\nthis machine:       {describe_machine(machine_facts())}"
        + "\nIf the change is intended, run `python -m tests.regression.regenerate` and review the diff of golden.json."
    )
