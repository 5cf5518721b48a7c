"""Every artifact of a run goes through this one storage layer (`pyarrow.fs`), written by the process
that holds the data: the learner uploads its own weights and optimizer state, the driver its
trainer state, metrics and config. A run lives under one `storage.uri`: a local path (the default:
`output_dir`) or any `pyarrow.fs` URI (`s3://bucket/prefix`, `gs://...`, `file:///mnt/shared/...`),
so no process ever relies on another node's local disk.

Durability rules (docs/reliability.md, "Publish last"):
- a file is written whole or not at all: local files go to a temporary name, are fsynced and renamed;
  on an object store the object is uploaded under a temporary key and copied over the target in one
  request (pyarrow has no abort: an upload its stream has begun is committed, cut short, when the stream
  is closed, as a `with` block does on Ctrl-C), and the temporary key is deleted if anything interrupts;
- a checkpoint exists only once its MANIFEST.json (every file with size and sha256) is written, last;
  a checkpoint directory without a valid manifest is never loaded and is cleaned up on resume; the
  names a manifest lists must stay inside its checkpoint (a run directory may come from someone else);
- resume takes the newest checkpoint whose files match their sha256; a newer one that does not is
  deleted with a warning naming it and the file;
- appends (metrics.jsonl) are fsynced on local storage; an object store has no append, so the
  whole object is rewritten.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import TokenforgeError, TransientStorageError

MANIFEST = "MANIFEST.json"
CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step_(\d+)$")


def is_uri(path: str) -> bool:
    return "://" in str(path)


CREDENTIALS_HELP = (
    "give credentials to the storage the usual way instead: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or "
    "~/.aws/credentials, AWS_PROFILE) for s3://, GOOGLE_APPLICATION_CREDENTIALS (or `gcloud auth application-default "
    "login`) for gs://"
)


def credentials_error(uri: str) -> str | None:
    """Why `uri` may not be used, if it carries credentials (`s3://KEY:SECRET@bucket/...`, which pyarrow accepts):
    a URI is shown in messages and commands and stored in config.yaml, trackers and Tune specs, so a secret in it
    would leak. The message shows only what follows the credentials. A secret holding '/', '?' or '#' ends the
    authority early ('KEY:SE' then '/CRET@bucket'): a non-numeric port with an '@' further on counts too."""
    if not is_uri(uri):
        return None
    scheme, rest = uri.split("://", 1)
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    port = authority.rpartition(":")[2]
    if "@" not in authority and not (":" in authority and not port.isdigit() and "@" in rest):
        return None
    shown = f"{scheme}://***@{rest.rsplit('@', 1)[1].split('?', 1)[0]}"  # everything before the last '@' hidden
    return (
        f"the URI {shown!r} holds credentials (user:secret@), which would be printed and stored with the run; "
        f"{CREDENTIALS_HELP}"
    )


TRANSIENT_ERRNOS = {
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.EAGAIN,
}
# pyarrow's S3 errors carry the AWS error name, the HTTP status and curl's reason as text (no errno)
TRANSIENT_TEXT = re.compile(
    r"timed? ?out|timeout|connection (reset|refused|aborted|closed)|broken pipe|couldn't connect|network_connection"
    r"|slow_?down|throttl|too many requests|service_?unavailable|internal_failure|HTTP status (429|5\d\d)",
    re.IGNORECASE,
)


def is_transient(error: OSError) -> bool:
    """Whether a storage error may pass if tried again (a timeout, a reset connection, S3 5xx or throttling),
    unlike a full disk, a missing permission or a missing bucket."""
    return error.errno in TRANSIENT_ERRNOS or bool(TRANSIENT_TEXT.search(str(error)))


@contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """A full disk, a missing permission or an unreachable bucket as one line naming the URI; one that may pass
    (is_transient) as a TransientStorageError, which a run retries."""
    try:
        yield
    except OSError as error:
        reason = {
            errno.ENOSPC: "no space left",
            errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "permission denied",
            errno.EROFS: "read-only file system",
        }.get(error.errno, str(error).splitlines()[0] if str(error) else type(error).__name__)
        kind = TransientStorageError if is_transient(error) else TokenforgeError
        raise kind(f"storage {uri!r}: {reason} (storage.uri / output_dir)") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Storage:
    """A run's directory: `uri` (local path or pyarrow.fs URI); paths below it are relative, '/'-separated."""

    uri: str

    def __post_init__(self) -> None:
        if problem := credentials_error(self.uri):
            raise TokenforgeError(f"storage: {problem}")
        if not is_uri(self.uri):  # absolute: the string travels to actors and Tune trials in other directories
            self.uri = str(Path(self.uri).expanduser().resolve())
        with storage_errors(self.uri):
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
            except (pa.ArrowInvalid, ValueError) as error:  # an unknown scheme or URI option
                raise TokenforgeError(f"storage {self.display()!r}: {error} (storage.uri / output_dir)") from None
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def child(self, relative: str) -> Storage:
        """The storage of a directory below this one (a URI keeps its ?options)."""
        base, sep, options = self.uri.partition("?")
        return Storage(f"{base.rstrip('/')}/{relative}{sep}{options}")

    def path(self, relative: str = "") -> str:
        return f"{self.root.rstrip('/')}/{relative}" if relative else self.root

    def display(self, relative: str = "") -> str:
        """The URI of a file or directory of the run, for messages (without a URI's ?options)."""
        base = self.uri.split("?", 1)[0].rstrip("/")
        return f"{base}/{relative}" if relative else base

    def for_commands(self) -> str:
        """The URI to put in a command the user may copy (`--resume ...`), with its ?options, which an
        S3-compatible server needs (never credentials: a URI with user:secret@ is refused, credentials_error)."""
        return f"'{self.uri}'" if "?" in self.uri else self.uri  # '?' and '&' are special to the shell

    def exists(self, relative: str) -> bool:
        with storage_errors(self.display(relative)):
            return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def read_bytes(self, relative: str) -> bytes:
        with storage_errors(self.display(relative)), self.fs.open_input_stream(self.path(relative)) as f:
            return f.read()

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode()

    def write_bytes(self, relative: str, data: bytes, staged: bool = True) -> None:
        """Atomically replace `relative` with `data` (readers see the old or the new file, never a part).
        staged=False: on an object store, upload straight to the key (see upload)."""
        target = self.path(relative)
        with storage_errors(self.display(relative)):
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            if not self.local:
                self.upload(target, data, staged)
                return
            temporary = f"{target}.tmp-{os.getpid()}"
            with open(temporary, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
            fsync_dir(os.path.dirname(target))

    def upload(self, target: str, data: bytes, staged: bool) -> None:
        """Put `data` at `target` of an object store. pyarrow has no abort: the stream of an upload completes it,
        cut short, when closed (as a `with` block does when Ctrl-C interrupts it), so the upload goes to a
        temporary key, copied over `target` in one request once whole (S3 CopyObject: the old object or the new
        one), and the temporary key is deleted if anything interrupts. staged=False uploads straight to
        `target` and deletes it if interrupted: for files read only through a manifest written after them
        (a checkpoint's), which may exceed the 5 GiB one S3 copy takes."""
        path = f"{target}.tmp-{uuid.uuid4().hex[:12]}" if staged else target
        try:
            with self.fs.open_output_stream(path) as f:
                f.write(data)
            if staged:
                self.fs.move(path, target)
        except BaseException:
            with suppress(
                Exception
            ):  # already gone, or the storage is what failed: the first error is the one to report
                self.fs.delete_file(path)
            raise

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode())

    def append_text(self, relative: str, text: str) -> None:
        """Append `text` durably (fsynced locally; an object store rewrites the whole object)."""
        if not self.local:
            old = self.read_bytes(relative) if self.exists(relative) else b""
            self.write_bytes(relative, old + text.encode())
            return
        target = self.path(relative)
        with storage_errors(self.display(relative)):
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with open(target, "a") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())

    def missing_files(self, directory: str, files: dict[str, dict]) -> list[str]:
        """The names in `files` ({name: {size, ...}}) that `directory` lacks or holds with another size."""
        with storage_errors(self.display(directory)):
            infos = self.fs.get_file_info([self.path(f"{directory}/{name}") for name in files])
        return [
            name
            for name, info in zip(files, infos)
            if info.type != pafs.FileType.File or info.size != files[name]["size"]
        ]

    def list_dir(self, relative: str) -> list[str]:
        """Names directly under `relative` ([] if it does not exist)."""
        if not self.exists(relative):
            return []
        with storage_errors(self.display(relative)):
            infos = self.fs.get_file_info(pafs.FileSelector(self.path(relative)))
        return sorted(info.base_name for info in infos)

    def delete_file(self, relative: str) -> None:
        with storage_errors(self.display(relative)):
            self.fs.delete_file(self.path(relative))

    def move(self, relative: str, to: str) -> None:
        """Rename a file (on object stores: a server-side copy, then a delete)."""
        with storage_errors(self.display(relative)):
            self.fs.create_dir(self.path(to).rsplit("/", 1)[0], recursive=True)
            self.fs.move(self.path(relative), self.path(to))

    def delete_dir(self, relative: str) -> None:
        with storage_errors(self.display(relative)):
            if self.exists(relative):
                self.fs.delete_dir(self.path(relative))

    def upload_dir(self, local: str | Path, relative: str) -> dict[str, dict]:
        """Copy every file under the local directory `local` (subdirectories too, e.g. a checkpoint's critic/) to
        `relative`/ (a checkpoint's, published by a manifest written afterwards: uploaded straight to their keys);
        returns {name: {size, sha256}}, names relative to `local` with / separators."""
        files = {}
        for file in sorted(Path(local).rglob("*")):
            if file.is_file():
                name = file.relative_to(local).as_posix()
                self.write_bytes(f"{relative}/{name}", file.read_bytes(), staged=False)
                files[name] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
        return files

    def sha256(self, relative: str) -> str:
        """The sha256 of a stored file, read in 4 MiB blocks."""
        digest = hashlib.sha256()
        with storage_errors(self.display(relative)), self.fs.open_input_stream(self.path(relative)) as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest()

    def download_dir(self, relative: str, local: str | Path, manifest: dict | None = None) -> Path:
        """Copy the files under `relative`/ to the local directory `local`, checking them against `manifest`
        (whose names read_manifest has checked to stay inside the checkpoint)."""
        local = Path(local)
        local.mkdir(parents=True, exist_ok=True)
        names = manifest["files"] if manifest else [n for n in self.list_dir(relative) if n != MANIFEST]
        for name in names:
            (local / name).parent.mkdir(
                parents=True, exist_ok=True
            )  # sharded and adapter checkpoints have subdirectories
            (local / name).write_bytes(self.read_bytes(f"{relative}/{name}"))
            if manifest and sha256_file(local / name) != manifest["files"][name]["sha256"]:
                raise TokenforgeError(
                    f"checkpoint {self.display(relative)!r}: {name} does not match its manifest (sha256)"
                )
        return local


def fsync_dir(path: str) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(step: int) -> str:
    return f"{CHECKPOINTS}/step_{step}"


def publish_checkpoint(storage: Storage, step: int, files: dict[str, dict]) -> str:
    """Write the manifest of step_N last, once every file is there: from now on the checkpoint exists.
    Returns its directory."""
    directory = checkpoint_dir(step)
    missing = storage.missing_files(directory, files)
    if missing:  # written by another process (the learner) to storage this process does not see
        raise TokenforgeError(
            f"checkpoint {storage.display(directory)!r}: {', '.join(missing)}, written by the learner, is not visible "
            f"from the driver: {storage.display()!r} is a disk local to each node; set storage.uri to storage every "
            "node shares (s3://..., gs://..., a path on a shared mount)"
        )
    storage.write_text(f"{directory}/{MANIFEST}", json.dumps({"step": step, "files": files}, indent=1))
    return directory


def read_manifest(storage: Storage, directory: str) -> dict | None:
    """The checkpoint's manifest if it is complete: present, parseable, and every file there with its size.
    A storage that cannot be read (network, permissions) raises: only a checkpoint known to be incomplete is
    None, since callers delete those. A manifest naming a file outside the checkpoint raises too: a run directory
    may come from someone else, and downloading that name would write wherever it points."""
    path = f"{directory}/{MANIFEST}"
    if not storage.exists(path):
        return None
    try:
        manifest = json.loads(storage.read_text(path))
        files = manifest["files"]
        if not isinstance(files, dict):
            return None
        outside = name_outside(storage, directory, files)
        complete = outside is None and not storage.missing_files(directory, files)
    except (ValueError, KeyError, TypeError):  # not a manifest of ours
        return None
    if outside is not None:
        raise TokenforgeError(
            f"checkpoint {storage.display(directory)!r}: {MANIFEST} lists {outside!r}, which is not a file inside the "
            "checkpoint (an absolute path, a '..' or empty part, or a link out of it); refusing to load it: delete "
            "that checkpoint, or use a run directory you trust"
        )
    return manifest if complete else None


def name_outside(storage: Storage, directory: str, names: Iterable[str]) -> str | None:
    """The first of a manifest's file names that does not stay inside the checkpoint `directory`, or None. A name
    is a relative '/'-separated path (subdirectories are allowed: sharded and adapter checkpoints have them)
    without empty, '.' or '..' parts, not also the directory of another name, and on a local disk not reached
    through a symlink that leads out of the checkpoint."""
    parents = {str(parent) for name in names for parent in PurePosixPath(name).parents}
    base = os.path.realpath(storage.path(directory)) if storage.local else None
    for name in names:
        if (
            name.startswith("/")
            or "\0" in name
            or name in parents
            or any(part in ("", ".", "..") for part in name.split("/"))
        ):
            return name
        if base is not None and not os.path.realpath(storage.path(f"{directory}/{name}")).startswith(base + os.sep):
            return name
    return None


def checkpoint_steps(storage: Storage) -> list[int]:
    """Steps of every step_N directory, published or not, ascending."""
    return sorted(int(m.group(1)) for name in storage.list_dir(CHECKPOINTS) if (m := STEP_DIR.match(name)))


def published_steps(storage: Storage) -> list[int]:
    """Steps of the published checkpoints, ascending."""
    return [s for s in checkpoint_steps(storage) if read_manifest(storage, checkpoint_dir(s)) is not None]


def published_checkpoints(storage: Storage) -> Iterator[tuple[int, str, dict]]:
    """(step, directory, manifest) of each published checkpoint, newest first."""
    for step in reversed(checkpoint_steps(storage)):
        manifest = read_manifest(storage, checkpoint_dir(step))
        if manifest is not None:
            yield step, checkpoint_dir(step), manifest


def latest_checkpoint(storage: Storage) -> tuple[str, dict] | None:
    """(directory, manifest) of the newest published checkpoint, or None."""
    return next(((directory, manifest) for _, directory, manifest in published_checkpoints(storage)), None)


def corrupt_file(storage: Storage, directory: str, manifest: dict) -> str | None:
    """The first file of a checkpoint whose content does not match its manifest's sha256 (every file read in full),
    or None."""
    files = manifest["files"]
    return next((name for name in files if storage.sha256(f"{directory}/{name}") != files[name]["sha256"]), None)


def resumable_checkpoint(storage: Storage, warn: Callable[[str], None]) -> tuple[str, dict] | None:
    """(directory, manifest) of the newest published checkpoint whose files all match their sha256, or None. Each
    candidate is read in full here, once per resume (the learner checks again what it downloads). A newer one that
    does not match is deleted, after `warn` names it and the file: kept, pruning would count it among the newest
    checkpoints and delete good ones."""
    for step, directory, manifest in published_checkpoints(storage):
        corrupt = corrupt_file(storage, directory, manifest)
        if corrupt is None:
            return directory, manifest
        warn(
            f"checkpoint {storage.display(directory)!r} is corrupt: {corrupt} does not match its manifest (sha256); "
            "deleting it and resuming from the checkpoint before"
        )
        delete_checkpoint(storage, step)
    return None


def remove_unpublished(storage: Storage) -> list[int]:
    """Delete every step_N directory without a valid manifest (a save cut short); returns their steps."""
    removed = [s for s in checkpoint_steps(storage) if read_manifest(storage, checkpoint_dir(s)) is None]
    for step in removed:
        storage.delete_dir(checkpoint_dir(step))
    return removed


def delete_checkpoint(storage: Storage, step: int) -> None:
    """The manifest goes first, so a delete cut short leaves an unpublished directory, never a broken checkpoint."""
    storage.delete_file(f"{checkpoint_dir(step)}/{MANIFEST}")
    storage.delete_dir(checkpoint_dir(step))


def prune_checkpoints(storage: Storage, keep: int, protected: set[int] = frozenset()) -> list[int]:
    """Delete all but the newest `keep` published checkpoints (and those in `protected`, e.g. the best)."""
    published = published_steps(storage)
    doomed = [s for s in published[: max(0, len(published) - keep)] if s not in protected]
    for step in doomed:
        delete_checkpoint(storage, step)
    return doomed


@contextmanager
def local_copy(storage: Storage, directory: str, manifest: dict) -> Iterator[Path]:
    """A checkpoint's files in a local temporary directory (verified against the manifest), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="tokenforge-ckpt-") as scratch:
        yield storage.download_dir(directory, scratch, manifest)
