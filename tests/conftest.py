"""Shared fixtures: one real local Ray per test session (token auth, temp HOME), tiny models."""

import os
import secrets
import signal
import sysconfig
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

# CI draws the same examples every run (a new random draw must never turn CI red by luck); run
# `HYPOTHESIS_PROFILE=explore pytest` to search new examples, with more of them.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", max_examples=1000, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# A suite started in the background by a non-interactive shell (`cmd &` in a script or CI step) inherits SIGINT
# ignored, and so would every `tokenforge` process a test starts: the Ctrl-C tests would send a signal nobody hears.
# Restore Python's Ctrl-C here, so that the processes the tests start get the default disposition.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Ray >= 2.52 writes its auth token under HOME: keep it (and every Ray/HF cache) out of the real home.
_HOME = tempfile.mkdtemp(prefix="tokenforge-test-home-")
os.environ["HOME"] = _HOME
os.environ["RAY_AUTH_MODE"] = "token"
_TOKEN = Path(_HOME) / ".ray" / "auth_token"
_TOKEN.parent.mkdir()
_TOKEN.write_text(secrets.token_hex(32))
os.environ["RAY_AUTH_TOKEN_PATH"] = str(_TOKEN)
os.environ.pop("RAY_ADDRESS", None)
# As in an activated venv: `tokenforge` on PATH is this installation's, so the commands a run prints read `tokenforge
# ...` (tests/test_cli_messages.py's new user runs without it, as the README's commands do)
os.environ["PATH"] = sysconfig.get_path("scripts") + os.pathsep + os.environ.get("PATH", "")
for key, value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}.items():
    os.environ.setdefault(key, value)  # the local moto S3 server of the storage tests (Ray's workers inherit them)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray with 2 CPUs, shared by every end-to-end test."""
    import ray

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False)  # the same cluster on a GPU machine
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def builtin_model_path() -> str:
    from pipeline.models.hf import BUILTIN_MODEL

    return str(BUILTIN_MODEL)


OBSERVED = ["trainer.total_steps=4", "trainer.eval_every=2", "trainer.prompts_per_step=16", "data.max_eval_samples=50"]


@pytest.fixture(scope="session")
def observed_run(ray_cluster, tmp_path_factory):
    """A 4-step run of the default task (eval and dumps at steps 0/2/4) for the dump, samples and report tests."""
    from pipeline.config import load_config
    from pipeline.driver.trainer import train

    out = tmp_path_factory.mktemp("observed") / "run"
    train(load_config(overrides=[*OBSERVED, f"output_dir={out}"]))
    return out
