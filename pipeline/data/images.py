"""The images of a vision-language dataset: the `image` column, read where it is used.

A row's image is an HF `datasets` Image value ({bytes, path}), PNG/JPEG bytes, or a path or storage URI. When the
data is loaded, resolve_images makes relative paths absolute (against `data.image_root`, default the data file's
directory) and checks that each exists. The rows carry bytes or a path, never decoded pixels: the rollout workers
and the learner open them themselves (open_image), so a large image set never passes through the driver's memory
as pixels.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from pipeline.data.prompts import encode_image_prompts
from pipeline.errors import TokenforgeError
from pipeline.storage import Storage, is_uri

IMAGE_COLUMN = "image"


def image_bytes_or_path(value) -> bytes | str | None:
    """The bytes or the path an image value holds (None if neither)."""
    if isinstance(value, dict):  # an HF Image value: bytes win over the path they were read from
        return value.get("bytes") or value.get("path")
    return value if isinstance(value, (bytes, str)) and value else None


def image_label(value) -> str:
    """An image value as text: its path, or its size when it is bytes."""
    source = image_bytes_or_path(value)
    return source if isinstance(source, str) else f"<image: {len(source or b'')} bytes>"


def resolve(path: str, root: str) -> str:
    """A relative image path under data.image_root (a URI or an absolute path stays as it is)."""
    if is_uri(path) or os.path.isabs(path):
        return path
    return root.rstrip("/") + "/" + path if is_uri(root) else str(Path(root) / path)


def read_image_bytes(value) -> bytes:
    source = image_bytes_or_path(value)
    if isinstance(source, bytes):
        return source
    if is_uri(source):
        parent, name = source.rsplit("/", 1)
        return Storage(parent).read_bytes(name)
    return Path(source).read_bytes()


def open_image(value, where: str = "an image") -> Image.Image:
    """The RGB image of an image value; `where` (e.g. "the prompt of group 7") names it in the one-line error."""
    try:
        return Image.open(io.BytesIO(read_image_bytes(value))).convert("RGB")
    except (OSError, UnidentifiedImageError, TypeError) as error:
        source = image_bytes_or_path(value)
        shown = f"{len(source)} bytes" if isinstance(source, bytes) else repr(source)
        raise TokenforgeError(f"{where}: cannot read the image ({shown}): {error}") from None


def resolve_images(table: pa.Table, key: str, root: str) -> pa.Table:
    """`table` with each image path resolved against `root` (data.image_root, or the data file's directory), checked
    cheaply: every row has bytes or a path, and each local path is an existing file (nothing is decoded); the first
    that is not is one line naming the file and the row."""
    column = table.column(IMAGE_COLUMN)
    values = []
    for row, value in enumerate(column.to_pylist()):
        source = image_bytes_or_path(value)
        if source is None:
            raise TokenforgeError(f"{key}: row {row} has no image (its `{IMAGE_COLUMN}` field is empty)")
        if isinstance(source, str):
            source = resolve(source, root)
            if not is_uri(source) and not Path(source).is_file():
                raise TokenforgeError(
                    f"{key}: row {row}: image file {source!r} does not exist; fix the path, or set data.image_root to "
                    "the directory the image paths are relative to"
                )
            value = {**value, "path": source} if isinstance(value, dict) else source
        values.append(value)
    index = table.column_names.index(IMAGE_COLUMN)
    return table.set_column(index, IMAGE_COLUMN, pa.array(values, column.type))


def batch_images(table: pa.Table, processor) -> tuple[dict, list[int]]:
    """The image inputs of a rollout table's distinct images (its groups': a group shares its prompt and image), as
    its processor makes them for the rollout worker, and the entry of each row."""
    first_row: dict[int, int] = {}  # group id -> its first row
    for row, group in enumerate(table.column("group_id").to_pylist()):
        first_row.setdefault(group, row)
    entry = {group: k for k, group in enumerate(first_row)}
    values = table.column(IMAGE_COLUMN).to_pylist()
    images = [open_image(values[row], f"the prompt of group {group}") for group, row in first_row.items()]
    inputs = encode_image_prompts(processor, [""] * len(images), images)[2]
    return inputs, [entry[group] for group in table.column("group_id").to_pylist()]
