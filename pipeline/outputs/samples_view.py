"""`tokenforge samples RUN_DIR`: read a run's rollout (or eval) dumps as a table of completions.

Groups (the samples of one prompt) are ranked by their mean total reward (eval dumps: by the first
eval metric); `--worst K` / `--best K` show the K lowest / highest groups, `--group G` one group.
Each response token is coloured by the reward it earned (`token_rewards`: green above 0, red below,
bold from half the largest magnitude on) where the terminal shows colour; elsewhere (a pipe, a log
file, NO_COLOR) each token with a non-zero reward is followed by it: `6[+0.17] 4 <eos>`.
"""

from __future__ import annotations

import pyarrow as pa
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.batch import DATASET_PROMPT, REWARD_PREFIX, metadata_columns, sampled_rows
from pipeline.data.images import IMAGE_COLUMN, image_label
from pipeline.errors import TokenforgeError
from pipeline.outputs import dumps
from pipeline.storage import Storage


def field_text(name: str, value) -> str:
    """A dataset field in a group's title: an image as its path (or size), several references joined by " | "."""
    if name == IMAGE_COLUMN:
        return image_label(value)
    if isinstance(value, list):
        return " | ".join(map(str, value))[:240]
    return str(value)[:60]


def token_style(reward: float, scale: float) -> str:
    """Green for a positive reward, red for a negative one, dim for 0; bold once |r| passes half the scale."""
    if reward == 0 or scale == 0:
        return "dim"
    colour = "green" if reward > 0 else "red"
    return f"bold {colour}" if abs(reward) >= scale / 2 else colour


def response_text(tokens: list[str], rewards: list[float], scale: float, colour: bool) -> Text:
    """The response token by token: coloured by reward, or (without colour) `token[+0.12]` for each
    token whose reward is not 0, tokens separated by spaces."""
    text = Text()
    for i, (token, reward) in enumerate(zip(tokens, rewards)):
        if colour:
            text.append(token, style=token_style(reward, scale))
        else:
            shown = repr(token) if not token or token != token.strip() else token
            text.append(("" if i == 0 else " ") + shown + (f"[{reward:+.2f}]" if reward else ""))
    return text


def pick_groups(table: pa.Table, score: str, worst: int | None, best: int | None, group: int | None) -> list[int]:
    """Group ids to show, in display order: ranked by the mean of `score` over each group's samples."""
    groups = group_scores(table, score)
    if group is not None:
        if group not in groups:
            raise TokenforgeError(
                f"group {group} is not in this dump (groups {min(groups)}..{max(groups)}); pick one of its groups"
            )
        return [group]
    ranked = sorted(groups, key=lambda g: (groups[g], g))
    return ranked[::-1][:best] if best is not None else ranked[:worst]


def group_scores(table: pa.Table, score: str) -> dict[int, float]:
    """Mean of `score` per group id over its samples (self_critical's greedy rows aside; samples where it does not
    apply count as nan, and rank first)."""
    values: dict[int, list[float]] = {}
    samples = sampled_rows(table)
    for gid, value in zip(samples.column("group_id").to_pylist(), samples.column(score).to_pylist()):
        values.setdefault(gid, []).append(float("nan") if value is None else value)
    return {gid: sum(v) / len(v) for gid, v in values.items()}


def group_table(rows: list[dict], title: str, rewards: list[str], colour: bool, scale: float) -> Table:
    """One group's samples: the response (token rewards shown), each reward's total, total, mean advantage."""
    learned = "token_rewards" in rows[0]  # a rollout dump (eval dumps have no learner columns)
    view = Table(title=Text(title), title_justify="left", show_edge=False)
    view.add_column("response", overflow="fold", ratio=1)
    for name in [
        *(n.removeprefix(REWARD_PREFIX) for n in rewards),
        *(["total", "mean A"] if learned else []),
        "done",
        "v",
    ]:
        view.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        if learned:
            response = response_text(row["response_tokens"], row["token_rewards"], scale, colour)
            mean_advantage = sum(row["advantages"]) / max(1, len(row["advantages"]))
            tail = [f"{row['total_reward']:.3f}", f"{mean_advantage:+.3f}"]
        else:
            response, tail = Text(row["response"]), []
        if row.get("greedy_baseline"):  # self_critical's baseline: scored, not trained on
            response = Text("[greedy baseline] ") + response
        totals = [f"{sum(row[n]):.3f}" if row[n] is not None else "n/a" for n in rewards]
        view.add_row(response, *totals, *tail, "yes" if row["finished"] else "cut", str(row["policy_version"]))
    return view


def show_samples(
    run: str,
    step: int | None = None,
    worst: int | None = None,
    best: int | None = None,
    group: int | None = None,
    eval_dump: bool = False,
    console: Console | None = None,
) -> None:
    """Print the chosen groups of the run's rollout dump (or eval dump) at `step` (default: the latest)."""
    storage = Storage(run)
    if not storage.exists("config.yaml"):
        raise TokenforgeError(
            f"{storage.display()!r} is not a tokenforge run (no config.yaml); pass the run's output_dir or storage URI"
        )
    kind = dumps.EVAL if eval_dump else dumps.ROLLOUTS
    step, table = dumps.read_dump(storage, kind, step)
    score = next(n for n in table.column_names if n.startswith("eval/")) if eval_dump else "total_reward"
    if worst is None and best is None and group is None:
        worst = 5
    chosen = pick_groups(table, score, worst, best, group)
    console = console or Console()
    colour = console.color_system is not None
    how = (
        f"group {group}"
        if group is not None
        else f"{'best' if best is not None else 'worst'} {len(chosen)} groups by mean {score}"
    )
    console.print(
        Text(f"{storage.display(dumps.dump_path(kind, step))}: {how} (of {table.num_rows} samples)", style="bold"),
        soft_wrap=True,
    )
    rewards = [n for n in table.column_names if n.startswith(REWARD_PREFIX)]
    references = [
        n for n in metadata_columns(table) if n != DATASET_PROMPT and not n.startswith("eval/")
    ]  # e.g. answer
    rows = table.to_pylist()
    scale = max((abs(r) for row in rows for r in row.get("token_rewards") or []), default=0.0)
    means = group_scores(table, score)
    for gid in chosen:
        members = [r for r in rows if r["group_id"] == gid]
        first = members[0]
        title = f"group {gid}: {first['prompt_text']!r}" + "".join(
            f"  {n}: {field_text(n, first[n])}" for n in references
        )
        console.print(group_table(members, f"{title}  (mean {score} {means[gid]:.3f})", rewards, colour, scale))
