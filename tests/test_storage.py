"""The storage layer on a local disk, without Ray: what counts as a published checkpoint, what resume may
delete, Tune restores, and the one-line errors. (Object stores and nodes without a shared disk:
tests/test_storage_e2e.py.)"""

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
