"""The model download's safety against the local Hub stand-in's faults: a dropped connection resumes, a wrong byte
is caught by the Hub's SHA-256, a full disk stops it before it starts, and a damaged model already in models/ is
found (the whole hash at install, magic and size at load) and replaced, never loaded."""

import filecmp
import shutil

import pytest

from fetch_model import read_default_model
from hf_standin import hub_env, unreachable_hub_url
from install_harness import fetch, gguf_files
from llama_chat import LlamaChat, ModelLoadError
from llamachat.model_download import ATTEMPTS
from llamachat.model_file import ModelRecord, read_record, sha256_of, write_record

DEFAULT = read_default_model()
DROP_AFTER = 10_000_000  # bytes per connection while the stand-in drops them
# The test double for the free-space query (a full disk cannot be made here): runs fetch_model.py with
# llamachat.model_download.free_disk_bytes answering 50 MB, less than SmolLM2's 98 MB.
FAKE_FREE_BYTES = 50_000_000
WITH_FAKE_FULL_DISK = (
    "-c",
    "import os, runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(sys.argv[0])); "
    f"import llamachat.model_download as download; download.free_disk_bytes = lambda folder: {FAKE_FREE_BYTES}; "
    "runpy.run_path(sys.argv[0], run_name='__main__')",
)


@pytest.fixture
def models(tmp_path):
    return tmp_path / "models"


def assert_verified_model(models, smollm2):
    model_file = models / DEFAULT.filename
    assert filecmp.cmp(model_file, smollm2, shallow=False)
    assert read_record(model_file) == ModelRecord(
        smollm2.stat().st_size, sha256_of(smollm2), read_record(model_file).source
    )
    assert not list(models.glob("*.partial"))


def install(hub, tmp_path, models):
    return fetch(hub_env(hub.url, tmp_path), "--models-dir", str(models))


def test_an_interrupted_download_resumes_where_it_stopped(hub, tmp_path, models, smollm2):
    hub.drop_after, hub.drops_left = DROP_AFTER, ATTEMPTS  # every connection of the first run drops
    first = install(hub, tmp_path, models)

    assert first.returncode == 1
    kept = ATTEMPTS * DROP_AFTER
    assert f"the {kept / 1e9:.2f} GB received are kept" in first.stderr
    assert "run the install again" in first.stderr
    assert hub.ranges == [f"bytes={n * DROP_AFTER}-" for n in range(ATTEMPTS)]  # each retry asked for the rest only
    assert gguf_files(models) == []
    assert (models / f"{DEFAULT.filename}.partial").stat().st_size == kept

    hub.ranges.clear()
    hub.bytes_sent = 0
    second = install(hub, tmp_path, models)
    assert second.returncode == 0, second.stderr
    assert "Resuming the download" in second.stdout
    assert hub.ranges == [f"bytes={kept}-"]
    assert hub.bytes_sent == smollm2.stat().st_size - kept  # nothing fetched twice
    assert_verified_model(models, smollm2)


def test_a_dropped_connection_is_resumed_within_the_same_run(hub, tmp_path, models, smollm2):
    hub.drop_after, hub.drops_left = DROP_AFTER, 1
    result = install(hub, tmp_path, models)

    assert result.returncode == 0, result.stderr
    assert "The connection failed after 0.01 GB" in result.stdout
    assert hub.ranges == ["bytes=0-", f"bytes={DROP_AFTER}-"]
    assert_verified_model(models, smollm2)


def test_a_wrong_byte_fails_the_sha256_and_nothing_is_kept(hub, tmp_path, models, smollm2):
    hub.flip_byte_at = smollm2.stat().st_size // 2
    result = install(hub, tmp_path, models)

    assert result.returncode == 1
    assert f"not the {sha256_of(smollm2)}" in result.stderr
    assert "the damaged file was deleted" in result.stderr
    assert list(models.iterdir()) == []  # no model, no record, no .partial to resume from

    hub.flip_byte_at = None
    assert install(hub, tmp_path, models).returncode == 0
    assert_verified_model(models, smollm2)


def test_not_enough_disk_space_stops_before_downloading_and_says_how_much(hub, tmp_path, models, smollm2):
    result = fetch(hub_env(hub.url, tmp_path), "--models-dir", str(models), python_options=WITH_FAKE_FULL_DISK)

    assert result.returncode == 1
    needed = smollm2.stat().st_size / 1e9
    assert f"not enough free disk space in {models}" in result.stderr
    assert f"needs {needed:.2f} GB more, and only {FAKE_FREE_BYTES / 1e9:.2f} GB is free" in result.stderr
    assert not hub.fetched(DEFAULT.filename)
    assert list(models.iterdir()) == []


def truncate(path):
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def flip_a_byte(path):
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 3)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize(
    ("damage", "found"),
    [(truncate, "bytes, but the download recorded"), (flip_a_byte, "its bytes are damaged")],
)
def test_a_damaged_model_in_models_is_found_at_install_and_replaced(hub, tmp_path, models, smollm2, damage, found):
    assert install(hub, tmp_path, models).returncode == 0
    damage(models / DEFAULT.filename)
    hub.requests.clear()

    again = install(hub, tmp_path, models)
    assert again.returncode == 0, again.stderr
    assert found in again.stdout
    assert "it will be replaced" in again.stdout
    assert hub.fetched(DEFAULT.filename)
    assert_verified_model(models, smollm2)


@pytest.mark.parametrize("damaged", [False, True])
def test_a_model_without_a_record_is_checked_against_the_hub(hub, tmp_path, models, smollm2, damaged):
    # As left by an older install, or by the module's own download at start.
    models.mkdir()
    shutil.copyfile(smollm2, models / DEFAULT.filename)
    if damaged:
        flip_a_byte(models / DEFAULT.filename)
    result = install(hub, tmp_path, models)

    assert result.returncode == 0, result.stderr
    assert "has no download record" in result.stdout
    assert hub.fetched(DEFAULT.filename) == damaged  # a good file is kept, a damaged one downloaded again
    assert_verified_model(models, smollm2)


def test_a_model_without_a_record_is_kept_when_the_hub_cannot_check_it(tmp_path, models, smollm2):
    models.mkdir()
    shutil.copyfile(smollm2, models / DEFAULT.filename)
    result = fetch(hub_env(unreachable_hub_url(), tmp_path), "--models-dir", str(models))

    assert result.returncode == 0, result.stderr
    assert "cannot be reached to check it" in result.stdout
    assert gguf_files(models) == [DEFAULT.filename]  # not swapped for the small fallback


def write_html(path):
    path.write_bytes(b"<html>Not found</html>")  # what a misconfigured proxy might have saved


@pytest.mark.parametrize(
    ("damage", "found"),
    [(truncate, "bytes, but the download recorded"), (write_html, "is not a GGUF file (it starts with b'<htm'")],
)
def test_the_module_never_loads_a_damaged_model_and_says_why(tmp_path, models, smollm2, damage, found):
    models.mkdir()
    model_file = models / DEFAULT.filename
    shutil.copyfile(smollm2, model_file)
    if damage is truncate:  # the size check needs the download's record; the magic check needs none
        write_record(model_file, ModelRecord(smollm2.stat().st_size, sha256_of(smollm2), "the test's copy"))
    damage(model_file)

    with pytest.raises(ModelLoadError) as error:
        LlamaChat(repo_id="", fileglob="", filename=DEFAULT.filename, model_dir=str(models), n_ctx=256)
    assert f"'{model_file}' is" in str(error.value)
    assert found in str(error.value)
    assert "run the module's install again to replace it" in str(error.value)
