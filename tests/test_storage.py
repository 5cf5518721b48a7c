"""The storage layer on a local disk, without Ray: what counts as a published checkpoint, what resume may
delete, Tune restores, and the one-line errors. (Object stores and nodes without a shared disk:
tests/test_storage_e2e.py.)"""

import json
from pathlib import Path

import pytest

from pipeline import storage as store
from pipeline.errors import TokenforgeError
from pipeline.storage import Storage
from pipeline.tune.experiment import restore_into


def published(run: Storage, step: int, weights: bytes = b"weights") -> str:
    directory = store.checkpoint_dir(step)
    run.write_bytes(f"{directory}/model.safetensors", weights)
    files = {"model.safetensors": {"size": len(weights), "sha256": store.sha256_bytes(weights)}}
    return store.publish_checkpoint(run, step, files)


def test_a_checkpoint_that_cannot_be_read_is_not_deleted_as_unpublished(tmp_path):
    """Resume deletes checkpoints known to be incomplete; a manifest that exists but cannot be read (here a
    directory in its place; on S3 a timeout) stops with one line instead of losing the checkpoint."""
    run = Storage(str(tmp_path))
    published(run, 2)
    run.write_bytes(f"{store.checkpoint_dir(3)}/model.safetensors", b"cut short")  # no manifest: a save cut short
    (tmp_path / store.checkpoint_dir(4) / store.MANIFEST).mkdir(parents=True)  # unreadable
    with pytest.raises(TokenforgeError, match=r"storage '.*step_4/MANIFEST.json'"):
        store.remove_unpublished(run)
    assert (tmp_path / store.checkpoint_dir(4)).is_dir()
    (tmp_path / store.checkpoint_dir(4) / store.MANIFEST).rmdir()
    assert store.remove_unpublished(run) == [3, 4] and store.published_steps(run) == [2]


def test_restoring_a_checkpoint_through_another_spelling_of_its_path_keeps_it(tmp_path):
    """Tune hands a trial a pointer to its own checkpoint, spelled through a symlink: nothing is deleted."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    run = Storage(str(tmp_path / "real"))
    published(run, 4)
    restored = restore_into(run, {"run_uri": str(tmp_path / "link"), "checkpoint": store.checkpoint_dir(4)})
    assert restored["step"] == 4 and store.published_steps(run) == [4]


def test_a_donors_checkpoint_replaces_the_trials_own_from_that_step_on(tmp_path):
    """PBT: the donor's step-4 weights replace the trial's step 4 and later; its step 2 stays; nothing staged stays."""
    donor, trial = Storage(str(tmp_path / "donor")), Storage(str(tmp_path / "trial"))
    published(donor, 4, b"donor")
    for step in (2, 4, 6):
        published(trial, step, b"own")
    restore_into(trial, {"run_uri": donor.uri, "checkpoint": store.checkpoint_dir(4)})
    assert store.published_steps(trial) == [2, 4]
    assert trial.read_bytes(f"{store.checkpoint_dir(4)}/model.safetensors") == b"donor"
    assert trial.list_dir(store.CHECKPOINTS) == ["step_2", "step_4"]


def test_a_donor_checkpoint_pruned_before_the_restore_leaves_the_trial_as_it_was(tmp_path):
    donor, trial = Storage(str(tmp_path / "donor")), Storage(str(tmp_path / "trial"))
    published(donor, 4, b"donor")
    published(trial, 4, b"own")
    (tmp_path / "donor" / store.checkpoint_dir(4) / "model.safetensors").unlink()  # pruned by the donor meanwhile
    with pytest.raises(TokenforgeError, match="gone or unpublished"):
        restore_into(trial, {"run_uri": donor.uri, "checkpoint": store.checkpoint_dir(4)})
    assert trial.read_bytes(f"{store.checkpoint_dir(4)}/model.safetensors") == b"own"


@pytest.mark.parametrize("uri", ["sftp://host/runs/x", "s3://bucket/runs/x?endpoint=127.0.0.1:9000"])
def test_a_storage_uri_pyarrow_cannot_take_is_one_line(uri):
    with pytest.raises(TokenforgeError, match=r"^storage '.*': .* \(storage.uri / output_dir\)$"):
        Storage(uri)


def test_relative_paths_travel_as_absolute_ones(tmp_path, monkeypatch):
    """The URI string goes to actors and Tune trials, whose working directories differ from the driver's."""
    monkeypatch.chdir(tmp_path)
    assert Storage("runs/x").uri == str(tmp_path / "runs" / "x")


def test_commands_keep_a_uris_options(tmp_path):
    """`--resume` of a run on an S3-compatible server needs its endpoint: the command keeps it, quoted."""
    run = Storage("s3://bucket/runs/x?endpoint_override=127.0.0.1:9000&scheme=http")
    assert run.for_commands() == "'s3://bucket/runs/x?endpoint_override=127.0.0.1:9000&scheme=http'"
    assert Storage(str(tmp_path)).for_commands() == str(tmp_path)


def crafted(run: Storage, step: int, names: list[str], data: bytes = b"payload") -> str:
    """A checkpoint whose manifest lists `names`, each with a file where joining the name onto the checkpoint's
    directory leads (so that a download trusting the names would find them complete and write them)."""
    directory = store.checkpoint_dir(step)
    for name in names:
        source = Path(f"{run.path(directory)}/{name}")
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_bytes(data)
    files = {name: {"size": len(data), "sha256": store.sha256_bytes(data)} for name in names}
    run.write_text(f"{directory}/{store.MANIFEST}", json.dumps({"step": step, "files": files}))
    return directory


@pytest.mark.parametrize(
    "name", ["ABSOLUTE", "../../../outside/victim", "shard/../../../../outside/victim", "a//b", "./a"]
)
def test_a_manifest_naming_a_file_outside_its_checkpoint_is_refused(tmp_path, name):
    """A run directory may come from someone else: a manifest entry like /home/user/.bashrc or ../../x would be
    written there by the download of eval or --resume. Reading the manifest refuses it, before anything is copied."""
    victim = tmp_path / "outside" / "victim"
    name = str(victim) if name == "ABSOLUTE" else name
    run = Storage(str(tmp_path / "run"))
    directory = crafted(run, 1, [name])
    for read in (
        lambda: store.read_manifest(run, directory),
        lambda: store.latest_checkpoint(run),
        lambda: store.remove_unpublished(run),
    ):
        with pytest.raises(TokenforgeError, match=r"MANIFEST.json lists .*, which is not a file inside the checkpoint"):
            read()
    victim.unlink(missing_ok=True)  # the '..' names' source files are the victim itself
    manifest = json.loads(run.read_text(f"{directory}/{store.MANIFEST}"))
    with pytest.raises(TokenforgeError):  # the path eval and the learner take
        with store.local_copy(run, directory, store.read_manifest(run, directory) or manifest):
            pass
    assert not victim.exists() and (tmp_path / "run" / directory).is_dir()  # nothing written, nothing deleted


def test_a_manifest_reaching_out_through_a_symlink_or_naming_a_file_as_a_directory_is_refused(tmp_path):
    run = Storage(str(tmp_path / "run"))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"payload")
    (tmp_path / "run" / store.checkpoint_dir(1)).mkdir(parents=True)
    (tmp_path / "run" / store.checkpoint_dir(1) / "shard").symlink_to(tmp_path / "outside")
    directory = crafted(run, 1, ["shard/secret"])
    with pytest.raises(TokenforgeError, match="'shard/secret', which is not a file inside the checkpoint"):
        store.read_manifest(run, directory)
    # on an object store the keys .../a and .../a/b may both exist; a download could not write both
    files = {name: {"size": 7, "sha256": store.sha256_bytes(b"payload")} for name in ("a/b", "a")}
    run.write_text(f"{store.checkpoint_dir(2)}/{store.MANIFEST}", json.dumps({"step": 2, "files": files}))
    with pytest.raises(TokenforgeError, match="'a', which is not a file inside the checkpoint"):
        store.read_manifest(run, store.checkpoint_dir(2))


def test_a_checkpoint_with_subdirectories_downloads_whole(tmp_path):
    """Sharded and adapter checkpoints keep files in subdirectories: those names are inside the checkpoint."""
    run = Storage(str(tmp_path / "run"))
    directory = crafted(run, 3, ["model.safetensors", "adapter/adapter_model.safetensors", "shards/a/part-1"])
    manifest = store.read_manifest(run, directory)
    with store.local_copy(run, directory, manifest) as local:
        assert sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()) == sorted(manifest["files"])


def test_resume_falls_back_past_a_checkpoint_whose_file_fails_its_sha256(tmp_path, capsys):
    """Bit rot (same size, other bytes) in the newest checkpoint: resume takes the one before, says which file of which
    checkpoint failed, and deletes the corrupt one (kept, pruning would count it among the newest and delete good
    ones)."""
    from pipeline.driver.trainer import TRAINER_STATE, start_state

    run = Storage(str(tmp_path / "run"))
    for step in (2, 4, 6):
        directory = published(run, step, b"weights of step %d" % step)
        run.write_text(
            f"{directory}/{TRAINER_STATE}", json.dumps({"step": step})
        )  # outside the manifest: read by start_state
    for step in (4, 6):
        weights = tmp_path / "run" / store.checkpoint_dir(step) / "model.safetensors"
        weights.write_bytes(weights.read_bytes().replace(b"weights", b"WEIGHTS"))
    capsys.readouterr()
    directory, state = start_state(run, resume=True)
    assert directory == store.checkpoint_dir(2) and state["step"] == 2
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("tokenforge: warning: checkpoint '") for line in lines)
    assert (
        "step_6' is corrupt: model.safetensors does not match its manifest (sha256)" in lines[0]
        and "step_4'" in lines[1]
    )
    assert store.checkpoint_steps(run) == [2]
