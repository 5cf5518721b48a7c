"""`tokenforge report RUN_OR_EXPERIMENT`: report.png and report.md from a run's metrics.jsonl, or from a
Tune experiment's trials, written next to them in the same storage (local or a URI).

A run's report plots, against the training step unless said otherwise:
- every eval metric against samples drawn (cumulative `rollout/samples`) and against wall time;
- each reward component's mean (`reward/<c>/mean`) and the weighted total;
- KL (`policy/kl`, only with a reference model), entropy (`policy/entropy`), response length;
- the step-time breakdown as a stacked area: rollout, reward, learn, publish (what the driver waited for), and the
  rest of `time/step_s` (dumps, bookkeeping), so the stack's top is the step time;
- the fraction of samples whose advantages are all 0 (no learning signal), `advantage/zero_frac`.

An experiment's report plots every trial's objective against its step, labelled by the values it
searched, and names the best trial (its last objective, as `tokenforge tune` ranks them) with its
parameters. The series a figure holds are listed in report.md and in the PNG's `tokenforge-series`
text chunk, so a reader (or a test) can check what was drawn. A vision-language run's report also holds captions.png:
held-out images with their captions at the first and the last eval (pipeline/outputs/caption_grid.py).
"""

from __future__ import annotations

import io
import json
import textwrap
from dataclasses import dataclass, field

import yaml

from pipeline.errors import TokenforgeError
from pipeline.outputs.caption_grid import GRID_PNG, caption_grid
from pipeline.outputs.experiment_files import SEARCHED_FILE, SPEC_FILE
from pipeline.outputs.metrics_log import METRICS_FILE, read_metrics
from pipeline.storage import Storage

PNG, MARKDOWN = "report.png", "report.md"
TIME_PARTS = [
    "time/rollout_s",
    "time/reward_s",
    "time/learn_s",
    "time/publish_s",
]  # what the driver waited for; the rest of time/step_s: "other"


@dataclass
class Panel:
    """One plot: named series of (x, y) points; `stacked` draws them as a stacked area."""

    title: str
    xlabel: str
    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    stacked: bool = False
    note: str = ""  # said instead of a plot when there is nothing to draw


def points(records: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    rows = [r for r in records if y in r and x in r]
    return [r[x] for r in rows], [r[y] for r in rows]


def run_panels(records: list[dict]) -> list[Panel]:
    """The panels of a run's report, from its metrics records (one per step)."""
    samples = 0.0
    for record in records:  # x of "against samples": samples drawn up to and including the step
        samples += record.get("rollout/samples", 0.0)
        record["samples"] = samples
        record["minutes"] = record.get("time/elapsed_s", 0.0) / 60
    keys = sorted({k for r in records for k in r})
    evals = [k for k in keys if k.startswith("eval/")]
    components = [k for k in keys if k.startswith("reward/") and k.endswith("/mean") and k != "reward/total/mean"]
    panels = [
        Panel("eval metrics vs samples", "samples drawn", {k: points(records, "samples", k) for k in evals}),
        Panel("eval metrics vs time", "minutes", {k: points(records, "minutes", k) for k in evals}),
        Panel(
            "rewards (mean per sample)",
            "step",
            {k: points(records, "step", k) for k in [*components, "reward/total/mean"]},
        ),
        Panel("KL to the reference", "step", {"policy/kl": points(records, "step", "policy/kl")}),
        Panel("entropy", "step", {"policy/entropy": points(records, "step", "policy/entropy")}),
        Panel(
            "response length (tokens)",
            "step",
            {"response/length_mean": points(records, "step", "response/length_mean")},
        ),
        Panel("step time (s)", "step", step_time_series(records), stacked=True),
        Panel(
            "samples without signal", "step", {"advantage/zero_frac": points(records, "step", "advantage/zero_frac")}
        ),
    ]
    for panel in panels:
        panel.series = {k: v for k, v in panel.series.items() if v[0]}
        if not panel.series:
            panel.note = "not logged by this run" + (
                " (no reference model: KL needs algorithm.kl_coef or kl_in_reward_coef > 0)"
                if panel.title.startswith("KL")
                else ""
            )
    return panels


def step_time_series(records: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """rollout / reward / learn / publish seconds the driver waited per step, and `other` = step time minus their
    sum."""
    steps = [r for r in records if "time/step_s" in r]
    x = [r["step"] for r in steps]
    series = {key.removeprefix("time/").removesuffix("_s"): (x, [r.get(key, 0.0) for r in steps]) for key in TIME_PARTS}
    series["other"] = (x, [max(0.0, r["time/step_s"] - sum(r.get(k, 0.0) for k in TIME_PARTS)) for r in steps])
    return series


def trial_label(params: dict, keys: list[str]) -> str:
    """`digit_match=0.5, lr=0.001`: the searched values, each key by its last dotted part (whole if that is
    ambiguous)."""
    short = [k.rsplit(".", 1)[-1] for k in keys]
    names = short if len(set(short)) == len(short) else keys
    return ", ".join(
        f"{n}={params.get(k):.4g}" if isinstance(params.get(k), float) else f"{n}={params.get(k)}"
        for n, k in zip(names, keys)
    )


def experiment_panels(experiment: Storage) -> tuple[list[Panel], list[str]]:
    """The objective of every trial against its step, labelled by its searched values, and the markdown
    lines naming the best trial and its parameters (none before a trial has reported the objective)."""
    spec = yaml.safe_load(experiment.read_text(SPEC_FILE))["spec"]
    metric, mode, keys = spec["tune"]["metric"], spec["tune"]["mode"], list(spec["search"])
    panel = Panel(f"{metric} of every trial", "step")
    finals: dict[str, tuple[float, dict]] = {}
    for trial in experiment.list_dir(""):
        run = experiment.child(f"{trial}/run")
        if not experiment.exists(f"{trial}/{SEARCHED_FILE}") or not run.exists(METRICS_FILE):
            continue
        params = json.loads(experiment.read_text(f"{trial}/{SEARCHED_FILE}"))
        x, y = points(read_metrics(run), "step", metric)
        if y:
            panel.series[trial_label(params, keys)] = (x, y)
            finals[trial] = (y[-1], params)
    if not finals:
        panel.note = f"no trial has reported {metric} yet"
        return [panel], []
    best = (max if mode == "max" else min)(finals, key=lambda t: finals[t][0])
    value, params = finals[best]
    lines = [
        f"Best trial: `{best}`, {metric} {value:.4g} (its last value; mode {mode}); its run: "
        f"`{experiment.display(f'{best}/run')}`",
        "",
        "| searched parameter | value |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | {params.get(k)} |" for k in keys]
    return [panel], lines


def draw(panels: list[Panel], title: str) -> bytes:
    """The panels on one figure (matplotlib Agg, no display needed), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    for axis, panel in zip(axes.flat, panels):
        axis.set_title(panel.title, fontsize=10)
        axis.set_xlabel(panel.xlabel, fontsize=8)
        axis.tick_params(labelsize=7)
        if panel.note:
            axis.text(
                0.5, 0.5, textwrap.fill(panel.note, 45), ha="center", va="center", fontsize=8, transform=axis.transAxes
            )
            axis.set_xticks([])
            axis.set_yticks([])
        elif panel.stacked:
            x = next(iter(panel.series.values()))[0]
            axis.stackplot(x, *[y for _, y in panel.series.values()], labels=list(panel.series))
            axis.legend(fontsize=7, loc="upper right")
        else:
            for label, (x, y) in panel.series.items():
                axis.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label)
            axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    png = io.BytesIO()
    listing = [f"{p.title}: {label}" for p in panels for label in p.series]
    figure.savefig(png, format="png", dpi=100, metadata={"tokenforge-series": json.dumps(listing)})
    plt.close(figure)
    return png.getvalue()


def markdown(panels: list[Panel], title: str, extra: list[str]) -> str:
    lines = [f"# {title}", "", f"![report]({PNG})", "", *extra, *([""] if extra else [])]
    lines += ["| panel | series | points | first | last | min | max |", "|---|---|---|---|---|---|---|"]
    for panel in panels:
        if panel.note:
            lines.append(f"| {panel.title} | {panel.note} | 0 | | | | |")
        for label, (_, y) in panel.series.items():
            lines.append(
                f"| {panel.title} | `{label}` | {len(y)} | {y[0]:.4g} | {y[-1]:.4g} | {min(y):.4g} | {max(y):.4g} |"
            )
    return "\n".join(lines) + "\n"


def write_report(location: str) -> Storage:
    """Write report.png and report.md into the run or experiment at `location`; returns its storage."""
    storage = Storage(location)
    if storage.exists(SPEC_FILE):
        panels, extra = experiment_panels(storage)
        if not extra:
            raise TokenforgeError(
                f"{storage.display()!r}: {panels[0].note}; run or resume the experiment first "
                "(tokenforge tune --resume DIR --trust-run-config)"
            )
        title = f"Tune experiment {storage.display()}"
    elif storage.exists(METRICS_FILE):
        records = read_metrics(storage)
        if not records:
            raise TokenforgeError(
                f"{storage.display(METRICS_FILE)!r} holds no metrics yet; report on the run once it has run a step"
            )
        panels, extra = run_panels(records), []
        title = f"run {storage.display()} (step {records[-1]['step']})"
        grid = caption_grid(storage)  # a vision-language run: its held-out images and captions
        if grid is not None:
            png, extra = grid
            if png is not None:
                storage.write_bytes(GRID_PNG, png)
    else:
        raise TokenforgeError(
            f"{storage.display()!r} is neither a tokenforge run ({METRICS_FILE}) nor a Tune experiment ({SPEC_FILE}); "
            "pass a run's output_dir / storage URI or an experiment directory"
        )
    storage.write_bytes(PNG, draw(panels, title))
    storage.write_text(MARKDOWN, markdown(panels, title, extra))
    return storage
