"""Where a run's relative output paths (`output_dir`, `tune.storage_path`) land.

On a laptop a relative path is relative to the current directory, as always. Inside a Ray job
(`ray job submit --working-dir .`) the current directory is Ray's temporary unpacked copy of the
checkout (`.../runtime_resources/working_dir_files/_ray_pkg_<hash>`): results written there are
hidden, deleted with the cluster's temp files, and a second submission of the same job would find
the first one's results "already there" in a copy that is not even the same. So:

- a URI (`s3://...`) or an absolute path is used exactly as given, on a laptop and in a job;
- a relative path resolves under the *output root*: `$TOKENFORGE_OUTPUT_ROOT` if set, else
  `~/tokenforge-outputs` inside a Ray job (or a `ray submit` through scripts/cluster_entry.py, which
  sets the variable), else the current directory;
- under an output root, a name that already holds an earlier run gets the next free suffix (`-2`,
  `-3`, ...), so resubmitting a job starts a new run beside the old one, never over it; one line on
  stdout says where the run writes.

A process is a Ray job's driver when Ray's job supervisor gave it `RAY_JOB_CONFIG_JSON_ENV_VAR` (the
variable Ray itself reads to recognise a job driver, ray/_private/worker.py); its JSON carries the
submission id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

OUTPUT_ROOT_ENV = "TOKENFORGE_OUTPUT_ROOT"
"""Base directory of relative output paths; set it to put cluster outputs elsewhere (an NFS mount)."""
JOB_OUTPUT_ROOT = "~/tokenforge-outputs"
"""Output root inside a Ray job when TOKENFORGE_OUTPUT_ROOT is not set (on the node that runs the driver: the head)."""
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's JobSupervisor for the job's entrypoint only


def ray_job_submission_id() -> str | None:
    """The submission id when this process is a Ray job's driver (entrypoint of `ray job submit`), else None."""
    raw = os.environ.get(RAY_JOB_ENV)
    if raw is None:
        return None
    try:
        metadata = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        metadata = {}
    return str(metadata.get("job_submission_id") or "unknown")


def output_root() -> Path | None:
    """Where relative output paths resolve; None = the current directory (a plain local run)."""
    if os.environ.get(OUTPUT_ROOT_ENV):
        return Path(os.environ[OUTPUT_ROOT_ENV]).expanduser().resolve()
    if ray_job_submission_id() is not None:
        return Path(JOB_OUTPUT_ROOT).expanduser().resolve()
    return None


def is_uri(path: str) -> bool:
    return "://" in path


def resolve_existing(path: str) -> str:
    """A path the user names to read or continue (`--resume DIR`): relative ones resolve under the output root."""
    root = output_root()
    if is_uri(path) or Path(path).expanduser().is_absolute() or root is None:
        return path
    return str(root / path)


def resolve_new(path: str, taken: Callable[[Path], bool], key: str) -> str:
    """A path a new run writes to. Under an output root, `path` if free, else `path-2`, `path-3`, ...
    (`taken(p)`: p holds an earlier run), with one line on stdout naming `key` and where the run writes."""
    root = output_root()
    if is_uri(path) or Path(path).expanduser().is_absolute() or root is None:
        return path
    first = target = root / path
    suffix = 1
    while taken(target):
        suffix += 1
        target = first.with_name(f"{first.name}-{suffix}")
    job = ray_job_submission_id()
    why = f"set by ${OUTPUT_ROOT_ENV}" if os.environ.get(OUTPUT_ROOT_ENV) else f"inside Ray job {job}"
    earlier = f"; {first} holds an earlier run" if suffix > 1 else ""
    print(f"tokenforge: {key} {path} -> {target} (relative outputs go under {root}, {why}{earlier})", flush=True)
    return str(target)
