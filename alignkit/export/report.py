"""Training report: PNG plots and one self-contained HTML page from runs' trainer_state.json, several runs overlaid.

Plots: loss (train/eval), learning rate, grad norm; for the preference methods (DPO, KTO, ORPO, SimPO) the rewards
(chosen/rejected), margins, accuracy and KTO's KL; for a reward model its pairwise accuracy and margin; for GRPO the
mean reward and each reward function's, their spread, the KL and the completion length. A key with ``*`` draws every
logged key it matches (``rewards/*/mean``: one line per GRPO reward function).
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

from alignkit.errors import ConfigError
from alignkit.export.outputs import check_output, staged_output
from alignkit.models.folders import check_json
from alignkit.runs import RunRecord

# file stem -> (title, log_history keys drawn on it). Train keys solid, eval keys dashed.
PLOTS = {
    "loss": ("Loss", ("loss", "eval_loss")),
    "learning_rate": ("Learning rate", ("learning_rate",)),
    "grad_norm": ("Gradient norm", ("grad_norm",)),
    "rewards": (
        "Preference rewards (DPO/KTO/ORPO/SimPO)",
        ("rewards/chosen", "rewards/rejected", "eval_rewards/chosen", "eval_rewards/rejected"),
    ),
    "margins": ("Preference reward margin (chosen - rejected)", ("rewards/margins", "eval_rewards/margins")),
    "accuracy": ("Preference reward accuracy", ("rewards/accuracies", "eval_rewards/accuracies")),
    "kl": ("KL to the reference (KTO, GRPO, online DPO)", ("kl", "eval_kl", "objective/kl")),
    "reward_model": (
        "Reward model: pairwise accuracy and margin",
        ("accuracy", "eval_accuracy", "margin", "eval_margin"),
    ),
    "grpo_reward": (
        "GRPO/RLOO/online DPO reward (mean of the sampled completions)",
        ("reward", "rewards/*/mean", "objective/scores"),
    ),
    "grpo_reward_std": ("GRPO reward spread within groups", ("reward_std", "frac_reward_zero_std")),
    "completion_length": ("GRPO completion length (tokens)", ("completions/mean_length",)),
}
_STYLES = {"rewards/rejected": ":", "eval_rewards/rejected": "-."}

Series = tuple[list[float], list[float]]  # (steps, values)


@dataclass
class RunLog:
    name: str
    stage: str
    log_history: list[dict]
    evals: dict[str, dict] = None  # eval folder name -> its eval_summary.json (alignkit eval --out, default eval/)


@dataclass
class Report:
    html: Path
    pngs: dict[str, Path]
    # plot -> run name -> key -> (steps, values), read back from the drawn matplotlib lines
    series: dict[str, dict[str, dict[str, Series]]]


def load_run(output_dir: str | Path) -> RunLog:
    output_dir = Path(output_dir)
    state = output_dir / "trainer_state.json"
    if not state.is_file():
        raise ConfigError(f"{output_dir}: no trainer_state.json. Fix: pass the output_dir of a finished run.")
    check_json(state, "rerun or resume the run that wrote it (a run cut short while saving leaves a broken file)")
    record = RunRecord.read(output_dir)
    stage = record.stage if record else "run"
    try:
        history = json.loads(state.read_text())["log_history"]
    except (ValueError, KeyError) as exc:
        raise ConfigError(
            f"{state}: not a readable trainer state ({exc}). Fix: pass the output_dir of a finished run (a run cut "
            "short while saving leaves a broken file: rerun or resume it)."
        ) from None
    evals = {}
    for summary in sorted(output_dir.glob("*/eval_summary.json")):
        try:
            evals[summary.parent.name] = json.loads(summary.read_text())
        except ValueError:
            continue  # a summary being written: the next report shows it
    return RunLog(name=f"{stage}:{output_dir.name}", stage=stage, log_history=history, evals=evals)


def key_series(log_history: list[dict], key: str) -> Series:
    points = [(e["step"], e[key]) for e in log_history if isinstance(e.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def write_report(output_dirs: list[str | Path], out_dir: str | Path | None = None) -> Report:
    """Plot every run in ``output_dirs`` into ``out_dir`` (default: ``<run>/report`` for one run,
    ``alignkit_report`` for several) and write ``report.html`` there."""
    import matplotlib

    matplotlib.use("Agg")
    runs = [load_run(d) for d in output_dirs]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # two runs in folders of the same name: tell them apart by full path
        for r, d in zip(runs, output_dirs):
            r.name = f"{r.stage}:{d}"
    out = Path(out_dir) if out_dir else (Path(output_dirs[0]) / "report" if len(runs) == 1 else Path("alignkit_report"))
    check_output(out, "folder", inputs=output_dirs, ours=lambda p: (p / "report.html").is_file(), flag="--out")
    with staged_output(out) as scratch:  # built beside it and swapped in whole
        pngs, series = _plot(runs, scratch)
        (scratch / "report.html").write_text(_html(runs, pngs))
    pngs = {stem: out / path.name for stem, path in pngs.items()}
    page = out / "report.html"
    print(f"report: {page} ({len(pngs)} plots)")
    return Report(html=page, pngs=pngs, series=series)


def _plot(runs: list[RunLog], out: Path) -> tuple[dict[str, Path], dict]:
    """One PNG per plot with any series into ``out``; their paths and the plotted series."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    pngs: dict[str, Path] = {}
    series: dict[str, dict[str, dict[str, Series]]] = {}
    for stem, (title, keys) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        drawn: dict[str, dict[str, Series]] = {}
        for i, run in enumerate(runs):
            for key in _expand(run.log_history, keys):
                steps, values = key_series(run.log_history, key)
                if not steps:
                    continue
                style = _STYLES.get(key, "--" if key.startswith("eval_") else "-")
                marker = ("x" if "rejected" in key else "o") if len(steps) < 3 else None  # lone eval points show
                (line,) = ax.plot(
                    steps, values, style, color=f"C{i}", marker=marker, markersize=4, label=f"{run.name} {key}"
                )
                drawn.setdefault(run.name, {})[key] = (line.get_xdata().tolist(), line.get_ydata().tolist())
        if drawn:
            ax.set(title=title, xlabel="step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            pngs[stem] = out / f"{stem}.png"
            fig.savefig(pngs[stem])
            series[stem] = drawn
        plt.close(fig)
    return pngs, series


def _expand(log_history: list[dict], keys: tuple[str, ...]) -> list[str]:
    """``keys`` with each ``*`` pattern replaced by the logged keys it matches, in order of first appearance."""
    import fnmatch

    logged = list(dict.fromkeys(k for entry in log_history for k in entry))
    return [m for key in keys for m in ([key] if "*" not in key else fnmatch.filter(logged, key))]


def _final(run: RunLog, key: str) -> str:
    _, values = key_series(run.log_history, key)
    return f"{values[-1]:.4g}" if values else "-"


def _html(runs: list[RunLog], pngs: dict[str, Path]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(r.name)}</td><td>{r.stage}</td><td>{_final(r, 'loss')}</td><td>{_final(r, 'eval_loss')}</td>"
        f"<td>{_final(r, 'rewards/accuracies')}</td></tr>"
        for r in runs
    )
    evals = "".join(
        f"<tr><td>{html.escape(r.name)}</td><td>{html.escape(folder)}</td><td>{html.escape(str(e.get('metric')))}</td>"
        f"<td>{e.get('rows', '-')}</td><td>"
        + ", ".join(f"{k} {v:.4g}" for k, v in e.items() if k not in ("metric", "rows") and isinstance(v, (int, float)))
        + "</td></tr>"
        for r in runs
        for folder, e in (r.evals or {}).items()
    )
    if evals:  # side by side: every run's alignkit eval summaries
        evals = (
            "<h2>Evaluations (alignkit eval)</h2><table><tr><th>run</th><th>eval</th><th>metric</th><th>rows</th>"
            f"<th>scores</th></tr>{evals}</table>"
        )
    images = evals + "".join(
        f'<h2>{html.escape(PLOTS[stem][0])}</h2><img alt="{stem}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}">'
        for stem, path in pngs.items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>alignkit training report</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;border-bottom:1px solid #ddd}</style>"
        "</head><body><h1>alignkit training report</h1><table><tr><th>run</th><th>stage</th><th>final train loss</th>"
        f"<th>final eval loss</th><th>final reward accuracy</th></tr>{rows}</table>{images}</body></html>\n"
    )
