"""The report's caption grid: held-out images of a vision-language run with their captions at the first and the
last eval (captions.png, and the same captions as a table in report.md), since people judge captions by looking."""

from __future__ import annotations

import io
import json
import textwrap

from pipeline.data.images import IMAGE_COLUMN, open_image
from pipeline.errors import TokenforgeError
from pipeline.outputs import dumps
from pipeline.storage import Storage

GRID_PNG = "captions.png"
IMAGES = 8  # the first eval prompts' images


def caption_grid(storage: Storage) -> tuple[bytes | None, list[str]] | None:
    """(the grid's PNG, report.md lines) of a run whose eval dumps hold images (no PNG when an image cannot be read
    here); None for other runs."""
    steps = dumps.dump_steps(storage, dumps.EVAL)
    if not steps:
        return None
    first, last = (dumps.read_dump(storage, dumps.EVAL, step)[1] for step in (steps[0], steps[-1]))
    if IMAGE_COLUMN not in first.column_names:
        return None
    score = next((n for n in first.column_names if n.startswith("eval/")), None)
    by_group = [{row["group_id"]: row for row in table.to_pylist()} for table in (first, last)]
    groups = sorted(set(by_group[0]) & set(by_group[1]))[:IMAGES]
    lines = [
        f"## Captions at the first and last eval (steps {steps[0]} and {steps[-1]})",
        "",
        f"![captions]({GRID_PNG})",
        "",
        f"| group | step {steps[0]} | step {steps[-1]} | a reference |",
        "|---|---|---|---|",
    ]
    captions = []
    for group in groups:
        before, after = by_group[0][group], by_group[1][group]
        shown = [
            f"{row['response']!r}" + (f" ({row[score]:.2f})" if score and row[score] is not None else "")
            for row in (before, after)
        ]
        reference = before.get("reference")
        reference = reference[0] if isinstance(reference, list) and reference else reference
        lines.append(f"| {group} | {shown[0]} | {shown[1]} | {reference if reference is not None else ''} |")
        captions.append((before[IMAGE_COLUMN], shown))
    try:  # an image path this machine cannot read (another node's disk) leaves the picture out, not the report
        images = [(open_image(value, f"eval group {group}"), shown) for (value, shown), group in zip(captions, groups)]
    except TokenforgeError as error:
        return None, [line for line in lines if GRID_PNG not in line] + ["", f"(no {GRID_PNG}: {error})"]
    return draw_grid(images, steps, score), lines


def draw_grid(captions: list, steps: list[int], score: str | None) -> bytes:
    """Each image above its captions at the first and the last eval (matplotlib Agg), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(captions))
    rows = -(-len(captions) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 4.6 * rows), squeeze=False)
    for axis, (image, (before, after)) in zip(axes.flat, captions):
        axis.imshow(image, interpolation="nearest")
        axis.set_xticks([])
        axis.set_yticks([])
        text = f"step {steps[0]}: {before}\nstep {steps[-1]}: {after}"
        axis.set_xlabel("\n".join(textwrap.fill(line, 38) for line in text.splitlines()), fontsize=7)
    for axis in list(axes.flat)[len(captions) :]:
        axis.set_visible(False)
    figure.suptitle(f"held-out captions, first and last eval{f' ({score} per caption)' if score else ''}", fontsize=10)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100, metadata={"tokenforge-captions": json.dumps(len(captions))})
    plt.close(figure)
    return png.getvalue()
