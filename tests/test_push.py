"""`push` and `convert --push-to-hub` against a Hub served on 127.0.0.1 (tests/hub_server.py).

The real huggingface_hub client runs unmodified in a subprocess (`HF_ENDPOINT` is read at import time) with
`HF_HUB_DISABLE_XET=1`; the server's state is inspected directly. Nothing reaches the real Hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import EXAMPLE, EXAMPLE_TOWER, REPO
from hub_server import LFS_PATTERNS, HubServer, User

from llava_convert.cli import main

WRITE, READ, BOB = "hf_alice_write_token", "hf_alice_read_token", "hf_bob_write_token"
TOKENS = (WRITE, READ, BOB)


@pytest.fixture(scope="module")
def hub():
    with HubServer({WRITE: User("alice", orgs=("team",)), READ: User("alice", role="read"), BOB: User("bob")}) as h:
        yield h


@pytest.fixture
def out(example_conversion, tmp_path) -> Path:
    """A private copy of the bundled example's conversion (a push renders its card again, naming the repo)."""
    d = tmp_path / "llava-v1.5-tiny-hf"
    shutil.copytree(example_conversion, d)
    return d


def env_for(hub, tmp_path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(REPO),
        HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def cli(hub, tmp_path, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "llava_convert.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env or env_for(hub, tmp_path),
    )
    for t in TOKENS:  # a token is never printed
        assert t not in proc.stdout and t not in proc.stderr
    return proc


def error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def local_files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def lfs_oids(files: dict[str, bytes]) -> set[str]:
    import fnmatch

    return {hashlib.sha256(b).hexdigest() for n, b in files.items() if any(fnmatch.fnmatch(n, p) for p in LFS_PATTERNS)}


def head(hub, repo_id: str, branch: str = "main") -> str:
    with hub.state.lock:
        return hub.state.repos[repo_id].branches[branch]


def test_first_push_creates_the_repo_with_the_files_and_card_then_uploads_only_changes(hub, out, tmp_path):
    r = cli(hub, tmp_path, "push", out, "alice/tiny", "--token", WRITE)
    assert r.returncode == 0, r.stderr
    remote = hub.state.files("alice/tiny")
    local = local_files(out)
    assert f"Pushed {len(local)} file(s)" in r.stdout
    assert set(remote) == set(local) | {".gitattributes"}  # .gitattributes: the Hub's own first commit
    assert all(remote[n] == b for n, b in local.items())
    assert 'model_id = "alice/tiny"' in local["README.md"].decode()  # the card names the repo it is in
    assert set(hub.state.lfs_uploads) == lfs_oids(local) and len(hub.state.lfs_uploads) == len(lfs_oids(local))
    assert hub.state.repos["alice/tiny"].private is False

    # Same directory again: no LFS object, no commit.
    commit, uploads, n_req = head(hub, "alice/tiny"), len(hub.state.lfs_uploads), len(hub.state.requests)
    r = cli(hub, tmp_path, "push", out, "alice/tiny", "--token", WRITE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Nothing to push:")
    assert head(hub, "alice/tiny") == commit and len(hub.state.lfs_uploads) == uploads
    assert not [m for m, p in hub.state.requests[n_req:] if m == "PUT" or p.endswith("/commit/main")]

    # One small file changed: one commit with that file, still no LFS upload.
    gen = json.loads((out / "generation_config.json").read_text())
    gen["max_new_tokens"] = 77
    (out / "generation_config.json").write_text(json.dumps(gen))
    r = cli(hub, tmp_path, "push", out, "alice/tiny", "--token", WRITE, "--commit-message", "longer answers")
    assert r.returncode == 0, r.stderr
    assert "Pushed 1 file(s)" in r.stdout and f"{len(local) - 1} unchanged" in r.stdout
    assert len(hub.state.lfs_uploads) == uploads
    with hub.state.lock:
        c = hub.state.repos["alice/tiny"].commits[head(hub, "alice/tiny")]
    assert c.message == "longer answers" and c.parent == commit
    assert hub.state.files("alice/tiny")["generation_config.json"] == (out / "generation_config.json").read_bytes()

    # Weights of the same size but other content (compared by sha256): uploaded again, as one new LFS object.
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    r = cli(hub, tmp_path, "push", out, "alice/tiny", "--token", WRITE, "--quiet")
    assert r.returncode == 0, r.stderr
    assert hub.state.lfs_uploads[uploads:] == [hashlib.sha256(data).hexdigest()]
    assert hub.state.files("alice/tiny")["model.safetensors"] == bytes(data)


def test_private_branch_and_pull_request(hub, out, tmp_path):
    r = cli(hub, tmp_path, "push", out, "team/priv", "--private", "--token", WRITE)
    assert r.returncode == 0, r.stderr
    assert hub.state.repos["team/priv"].private is True
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as e:  # not visible without a token
        urllib.request.urlopen(f"{hub.url}/api/models/team/priv")
    assert e.value.code == 401

    r = cli(hub, tmp_path, "push", out, "alice/branched", "--revision", "dev", "--token", WRITE)
    assert r.returncode == 0, r.stderr
    assert set(hub.state.files("alice/branched", "main")) == {".gitattributes"}
    assert hub.state.files("alice/branched", "dev")["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert "(dev)" in r.stdout

    r = cli(hub, tmp_path, "push", out, "alice/reviewed", "--create-pr", "--token", WRITE)
    assert r.returncode == 0, r.stderr
    assert set(hub.state.files("alice/reviewed", "main")) == {".gitattributes"}
    assert set(hub.state.files("alice/reviewed", "refs/pr/1")) == set(local_files(out)) | {".gitattributes"}
    assert f"{hub.url}/alice/reviewed/discussions/1" in r.stdout


def test_rejected_tokens_exit_2_with_nothing_committed(hub, out, tmp_path):
    r = cli(hub, tmp_path, "push", out, "alice/guarded", "--token", WRITE, "--quiet")
    assert r.returncode == 0, r.stderr
    commit, objects = head(hub, "alice/guarded"), dict(hub.state.lfs)
    (out / "extra.json").write_text("{}")

    r = cli(hub, tmp_path, "push", out, "alice/guarded", "--token", "hf_not_a_token", "--quiet")
    assert r.returncode == 2
    assert "the Hub rejected the token (401 Unauthorized)" in error_line(r)

    r = cli(hub, tmp_path, "push", out, "alice/guarded", "--token", READ, "--quiet")
    assert r.returncode == 2
    assert "the token is read-only" in error_line(r)

    r = cli(hub, tmp_path, "push", out, "alice/guarded", "--token", BOB, "--quiet")
    assert r.returncode == 2
    assert "the token may not write to this repo (403 Forbidden)" in error_line(r)
    assert head(hub, "alice/guarded") == commit and hub.state.lfs == objects

    r = cli(hub, tmp_path, "push", out, "alice/bobs-idea", "--token", BOB, "--quiet")
    assert r.returncode == 2
    assert "403 Forbidden" in error_line(r) and "creating the repo" in error_line(r)
    assert "alice/bobs-idea" not in hub.state.repos


def test_users_own_card_is_published_as_is_and_checked_by_the_hub(hub, out, tmp_path):
    mine = "---\nlicense: mit\ntags: [mine]\n---\n\n# Hand-written card\n"
    (out / "README.md").write_text(mine)
    r = cli(hub, tmp_path, "push", out, "alice/own-card", "--token", WRITE, "--quiet")
    assert r.returncode == 0, r.stderr
    assert hub.state.files("alice/own-card")["README.md"].decode() == mine
    (out / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    r = cli(hub, tmp_path, "push", out, "alice/own-card", "--token", WRITE, "--quiet")
    assert r.returncode == 2
    assert "Invalid metadata in README.md" in error_line(r)
    assert hub.state.files("alice/own-card")["README.md"].decode() == mine


def test_token_from_environment_or_none(hub, out, tmp_path):
    r = cli(hub, tmp_path, "push", out, "alice/from-env", "--quiet")
    assert r.returncode == 2
    assert error_line(r) == (
        "Error: Cannot push: no Hugging Face token; pass --token, set HF_TOKEN or log in with `hf auth login`"
    )
    assert "alice/from-env" not in hub.state.repos
    r = cli(hub, tmp_path, "push", out, "alice/from-env", "--quiet", env=env_for(hub, tmp_path, HF_TOKEN=WRITE))
    assert r.returncode == 0, r.stderr
    assert "README.md" in hub.state.files("alice/from-env")


@pytest.mark.parametrize("damage", ["no-config", "missing-shard", "truncated-shard", "staging"])
def test_incomplete_conversion_is_refused(example_conversion, tmp_path, damage):
    d = tmp_path / "conv"
    shutil.copytree(example_conversion, d)
    if damage == "no-config":
        (d / "config.json").unlink()
        want = "no config.json (not a converted checkpoint)"
    elif damage == "missing-shard":
        index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}
        (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        want = "model.safetensors.index.json names model-00002-of-00002.safetensors, which is missing"
    elif damage == "truncated-shard":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) - 100])
        want = "model.safetensors is truncated"
    else:
        d = d.rename(tmp_path / ".conv.partial-1234")
        want = "staging directory of an unfinished conversion; push conv once"
    r = CliRunner().invoke(main, ["push", str(d), "alice/whatever", "--token", WRITE])
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and want in r.output, r.output


def test_offline_mode_is_refused(example_conversion):
    # conftest sets HF_HUB_OFFLINE=1 for this process, as CI does
    r = CliRunner().invoke(main, ["push", str(example_conversion), "alice/x", "--token", WRITE])
    assert r.exit_code == 2
    assert r.output == "Error: Cannot push to alice/x: HF_HUB_OFFLINE is set; publishing needs the Hub\n"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    from llava_convert.convert import convert

    out = tmp_path_factory.mktemp("sharded") / "llava-tiny-sharded"
    convert(EXAMPLE, out, vision_tower=EXAMPLE_TOWER, max_shard_size="150KB", progress=False)
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    return out


@pytest.mark.slow
def test_dropped_connection_fails_then_rerun_uploads_only_the_rest(hub, sharded, tmp_path):
    shards = sorted(sharded.glob("model-*.safetensors"))
    victim = hashlib.sha256(shards[1].read_bytes()).hexdigest()
    hub.state.drop_oids[victim] = 100  # every attempt (the client retries 5 times with backoff)
    before = len(hub.state.lfs_uploads)
    stored = set(hub.state.lfs)  # objects earlier tests of this module put on the server are not sent again
    r = cli(hub, tmp_path, "push", sharded, "alice/flaky", "--token", WRITE, "--quiet")
    assert r.returncode == 3, r.stderr
    assert "interrupted while uploading and committing" in r.stderr and "re-running the same command resumes" in r.stderr
    assert set(hub.state.files("alice/flaky")) == {".gitattributes"}  # nothing half-committed
    # The client uploads objects concurrently and stops at the failure: which others got through varies.
    first = hub.state.lfs_uploads[before:]
    assert victim not in first

    hub.state.drop_oids.clear()
    before = len(hub.state.lfs_uploads)
    r = cli(hub, tmp_path, "push", sharded, "alice/flaky", "--token", WRITE, "--quiet")
    assert r.returncode == 0, r.stderr
    again = hub.state.lfs_uploads[before:]
    # Only what the interrupted push had not uploaded, each object once.
    assert victim in again and sorted(again) == sorted(lfs_oids(local_files(sharded)) - set(first) - stored)
    remote = hub.state.files("alice/flaky")
    assert all(remote[n] == b for n, b in local_files(sharded).items())


DOWNLOAD_AND_RUN = r"""
import json, sys
from pathlib import Path
from huggingface_hub import snapshot_download
repo, local = sys.argv[1], Path(sys.argv[2])
snap = Path(snapshot_download(repo))
got = {p.relative_to(snap).as_posix(): p.read_bytes() for p in snap.rglob("*") if p.is_file()}
want = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()}
assert set(got) == set(want) | {".gitattributes"}, (sorted(got), sorted(want))
assert all(got[k] == v for k, v in want.items())
print("identical", len(want))
code = (local / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
exec(compile(code, "README.md", "exec"))
"""


def test_pushed_repo_downloads_back_identical_and_its_card_snippet_runs(hub, out, tmp_path):
    r = cli(hub, tmp_path, "push", out, "alice/roundtrip", "--token", WRITE, "--quiet")
    assert r.returncode == 0, r.stderr
    proc = subprocess.run(
        [sys.executable, "-c", DOWNLOAD_AND_RUN, "alice/roundtrip", str(out)], capture_output=True, text=True,
        timeout=600, env=env_for(hub, tmp_path, HF_TOKEN=WRITE),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"identical {len(local_files(out))}")
    # The snippet loaded the model from the (test) Hub with transformers and generated text.
    assert any(m == "GET" and "/alice/roundtrip/resolve/" in p for m, p in hub.state.requests)


@pytest.mark.slow
def test_convert_push_to_hub_check_pushes_only_a_checked_conversion(hub, tmp_path):
    good = tmp_path / "good"
    r = cli(hub, tmp_path, "convert", EXAMPLE, good, "--vision-tower", EXAMPLE_TOWER, "--quiet", "--check",
            "--push-to-hub", "alice/checked", "--token", WRITE)
    assert r.returncode == 0, r.stderr
    assert "PASS" in r.stdout and f"Pushed {len(local_files(good))} file(s)" in r.stdout
    remote = hub.state.files("alice/checked")
    assert json.loads(remote["check-report.json"])["verdict"] == "pass"
    readme = remote["README.md"].decode()
    assert "**PASS**" in readme and 'model_id = "alice/checked"' in readme
    assert re.search(r"- Command: `llava-convert convert .* --push-to-hub alice/checked`", readme)

    # The wrong chat template: the check fails (prompt ids differ), exit 1, nothing pushed.
    bad = tmp_path / "bad"
    r = cli(hub, tmp_path, "convert", EXAMPLE, bad, "--vision-tower", EXAMPLE_TOWER, "--quiet", "--check",
            "--chat-template", "llava_llama_2", "--push-to-hub", "alice/unchecked", "--token", WRITE)
    assert r.returncode == 1, r.stderr
    assert "FAIL" in r.stdout and r.stderr.splitlines()[-1].startswith("Check failed:")
    assert "alice/unchecked" not in hub.state.repos
    assert json.loads((bad / "check-report.json").read_text())["verdict"] == "fail"

    # No token: refused before converting.
    r = cli(hub, tmp_path, "convert", EXAMPLE, tmp_path / "never", "--vision-tower", EXAMPLE_TOWER,
            "--push-to-hub", "alice/never")
    assert r.returncode == 2 and "no Hugging Face token" in error_line(r)
    assert not (tmp_path / "never").exists()
    r = CliRunner().invoke(main, ["convert", str(EXAMPLE), str(tmp_path / "x"), "--dry-run", "--push-to-hub", "a/b"])
    assert r.exit_code == 2 and "--push-to-hub cannot be combined with --dry-run" in r.output
