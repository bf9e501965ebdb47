"""`push`: publish a converted directory to the Hugging Face Hub, through huggingface_hub only.

    check the directory   a complete conversion: config.json, every shard the index names, readable safetensors
                          headers, not a staging directory of an unfinished run
    token                 --token, else huggingface_hub's own lookup (HF_TOKEN, then the saved login); never printed
    whoami, create_repo   the token is valid and may write; the repo exists (created, --private, when missing)
    diff                  the remote tree at the target revision (list_repo_tree) against the local files: LFS files by
                          sha256, small files by git blob id; only new or changed files go into the commit, and weight
                          files the directory no longer has are deleted (a conversion re-sharded differently)
    create_commit         preupload + LFS batch (the Hub names the objects it lacks: nothing already there is sent
                          again, so re-running after an interrupted push resumes) + one atomic commit, or a PR

Errors: exit 2 for what the user must fix (not a conversion, no token, a token the Hub rejects or that cannot write),
exit 3 when the transfer itself failed (network, server): re-running the same command resumes.
"""

from __future__ import annotations

import fnmatch
import json
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .card import CARD_NAME, REPORT_NAME, is_own_card, refresh_card, sha256_file
from .errors import LlavaConvertError
from .layouts import HF_MODEL_TYPES

# Remote files of these kinds that the local directory lacks are stale shards of an earlier push: deleted.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
_STAGING = re.compile(r"^\.(?P<name>.+)\.(partial|old)-\d+$")


class HubTransferError(LlavaConvertError):
    """The upload or commit failed on the way (network, server error): re-running the push resumes it."""

    exit_code = 3


@dataclass
class PushResult:
    """What a push did."""

    repo_id: str
    url: str
    revision: str
    commit: str | None = None
    pr_url: str | None = None
    uploaded: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.uploaded and not self.deleted:
            return f"Nothing to push: {self.url} ({self.revision}) already has these {len(self.unchanged)} files"
        where = self.pr_url or f"{self.url} ({self.revision})"
        deleted = f", deleted {len(self.deleted)} stale file(s)" if self.deleted else ""
        return (
            f"Pushed {len(self.uploaded)} file(s), {_size(self.uploaded_bytes)}, to {where}{deleted}; "
            f"{len(self.unchanged)} unchanged; commit {self.commit}"
        )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ----------------------------------------------------------------------------------------------------------
# The local directory
# ----------------------------------------------------------------------------------------------------------


def _safetensors_ok(path: Path) -> str | None:
    """Why PATH is not a whole safetensors file (header unreadable, data shorter than the header says), or None."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return "too short for a safetensors header"
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                return "not a safetensors file"
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"unreadable safetensors header ({e})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    size = path.stat().st_size
    if size < 8 + n + end:
        return f"truncated: {size} bytes, its header needs {8 + n + end}"
    return None


def check_conversion(directory: Path) -> list[Path]:
    """The files to publish from DIRECTORY, after checking it is a complete conversion.

    Raises:
        LlavaConvertError: not a directory, a staging directory, no or bad config.json, missing or truncated shards.
    """
    d = Path(directory)
    if not d.is_dir():
        raise LlavaConvertError(f"Cannot push {d}: no such directory")
    m = _STAGING.match(d.resolve().name)
    if m:
        raise LlavaConvertError(
            f"Cannot push {d}: it is the staging directory of an unfinished conversion; push {m.group('name')} "
            "once the conversion has completed"
        )
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise LlavaConvertError(f"Cannot push {d}: no config.json (not a converted checkpoint)")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlavaConvertError(f"Cannot push {d}: {cfg_path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("model_type") not in HF_MODEL_TYPES:
        got = config.get("model_type") if isinstance(config, dict) else None
        raise LlavaConvertError(
            f"Cannot push {d}: {cfg_path} has model_type {got!r}, not a Hugging Face llava / llava_next checkpoint"
        )
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise LlavaConvertError(f"Cannot push {d}: unreadable {index.name} ({e})") from None
        for s in shards:
            if "/" in s or s.startswith(".") or not (d / s).is_file():
                raise LlavaConvertError(f"Cannot push {d}: {index.name} names {s}, which is missing")
    elif (d / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise LlavaConvertError(f"Cannot push {d}: no model.safetensors or model.safetensors.index.json")
    for s in shards:
        why = _safetensors_ok(d / s)
        if why:
            raise LlavaConvertError(f"Cannot push {d}: {s} is {why}")
    return sorted(
        p for p in d.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(d).parts)
    )


# ----------------------------------------------------------------------------------------------------------
# Token and errors
# ----------------------------------------------------------------------------------------------------------


def resolve_token(token: str | None) -> str:
    """--token, else HF_TOKEN, else the saved login (huggingface_hub's own order)."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise LlavaConvertError(
            "Cannot push: no Hugging Face token; pass --token, set HF_TOKEN or log in with `hf auth login`"
        )
    return found


def _status(e: Exception) -> int | None:
    resp = getattr(e, "response", None)
    return getattr(resp, "status_code", None)


def _hub_error(e: Exception, repo_id: str, what: str) -> LlavaConvertError:
    """One line for a failed Hub call: 401/403/404 are the user's to fix (exit 2), the rest a transfer error."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    status = _status(e)
    if isinstance(e, RevisionNotFoundError):
        return LlavaConvertError(f"Cannot push to {repo_id}: {what}: no such revision on the Hub")
    if status == 401:
        return LlavaConvertError(
            f"Cannot push to {repo_id}: the Hub rejected the token (401 Unauthorized) while {what}; "
            "check --token / HF_TOKEN / `hf auth login`"
        )
    if status == 403:
        return LlavaConvertError(
            f"Cannot push to {repo_id}: the token may not write to this repo (403 Forbidden) while {what}; "
            "use a token with write access to its namespace"
        )
    if isinstance(e, RepositoryNotFoundError) or status == 404:
        return LlavaConvertError(f"Cannot push to {repo_id}: repo not found or not visible to this token ({what})")
    if isinstance(e, ValueError) and not isinstance(e, HfHubHTTPError):  # e.g. the Hub's README.md metadata check
        return LlavaConvertError(f"Cannot push to {repo_id}: {' '.join(str(e).split())}")
    if isinstance(e, HfHubHTTPError) and status is not None and 400 <= status < 500:
        msg = getattr(e, "server_message", None) or str(e).splitlines()[0]
        return LlavaConvertError(f"Cannot push to {repo_id}: the Hub refused {what} ({status}: {msg})")
    msg = " ".join(str(e).split()) or type(e).__name__
    if e.__cause__ is not None:
        msg += f" ({type(e.__cause__).__name__}: {' '.join(str(e.__cause__).split())[:200]})"
    return HubTransferError(
        f"Push to {repo_id} interrupted while {what}: {msg}; nothing was committed, and re-running the same "
        "command resumes (files already uploaded are not sent again)"
    )


# ----------------------------------------------------------------------------------------------------------
# Push
# ----------------------------------------------------------------------------------------------------------


def preflight(repo_id: str, token: str | None):
    """Token present and accepted, and not read-only; returns `(HfApi, token)`. Cheap: one whoami call."""
    from huggingface_hub import HfApi

    from . import __version__

    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo_id):
        raise LlavaConvertError(f"Cannot push to {repo_id!r}: expected a repo id of the form namespace/name")
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise LlavaConvertError(f"Cannot push to {repo_id}: HF_HUB_OFFLINE is set; publishing needs the Hub")
    token = resolve_token(token)
    api = HfApi(token=token, library_name="llava-convert", library_version=__version__)
    try:
        me = api.whoami()
    except Exception as e:  # noqa: BLE001 - mapped to one line
        raise _hub_error(e, repo_id, "checking the token (whoami)") from None
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise LlavaConvertError(
            f"Cannot push to {repo_id}: the token is read-only; use a token with write access"
        )
    return api, token


def push(
    directory: Path | str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    progress: bool = True,
    log=None,
) -> PushResult:
    """Publish the converted DIRECTORY to the Hub repo REPO_ID; upload only what the repo lacks.

    Args:
        directory: a directory written by `convert` or `quantize`.
        repo_id: `namespace/name`; created when missing.
        private: create the repo private (an existing repo keeps its visibility).
        revision: the branch to commit to (created from the default branch when missing); with `create_pr`, the
            branch the pull request targets.
        create_pr: open a pull request instead of committing to the branch.
        commit_message: the commit's title.
        token: a Hub token; default: HF_TOKEN, then the saved login. Never printed or written.
        progress: what is uploaded, and progress bars by bytes (comparing, uploading), on stderr.
        log: a function taking one line of progress text or warning (default: stderr).

    Returns:
        A `PushResult` (files uploaded / unchanged / deleted, commit id, PR url).

    Raises:
        LlavaConvertError: not a complete conversion, no token, a token the Hub rejects or that cannot write (exit 2).
        HubTransferError: the transfer failed on the way (exit 3); re-running resumes.

    Example:
        >>> push("llava-1.5-7b-hf", "me/llava-1.5-7b-hf", private=True)  # doctest: +SKIP
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    from . import __version__

    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    directory = Path(directory)
    check_conversion(directory)
    api, token = preflight(repo_id, token)

    try:
        url = str(api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, repo_id, "creating the repo") from None
    if revision and not create_pr:
        try:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        except Exception as e:  # noqa: BLE001
            raise _hub_error(e, repo_id, f"creating branch {revision!r}") from None
    target = revision or "main"

    # The tool's card names the repo in its usage snippet; a card the user wrote is published as it is.
    card = directory / CARD_NAME
    if card.is_file() and is_own_card(card):
        refresh_card(directory, repo_id=repo_id)
    elif not card.is_file():
        say(f"Warning: {directory} has no {CARD_NAME}; the repo gets no model card")
    files = check_conversion(directory)
    report = directory / REPORT_NAME
    if report.is_file():
        try:
            if json.loads(report.read_text()).get("verdict") == "fail":
                say(f"Warning: {report} records a FAILED check; its figures are published with the model")
        except (json.JSONDecodeError, AttributeError):
            pass

    try:
        remote = {f.path: f for f in api.list_repo_tree(repo_id, revision=target, recursive=True)
                  if hasattr(f, "blob_id")}
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, repo_id, f"listing {target}") from None

    result = PushResult(repo_id=repo_id, url=url, revision=target)
    additions = []
    local_names = set()
    total = sum(p.stat().st_size for p in files)
    from huggingface_hub.utils import sha
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="comparing", file=sys.stderr,
              disable=not progress, leave=False) as bar:
        for p in files:
            name = p.relative_to(directory).as_posix()
            local_names.add(name)
            size = p.stat().st_size
            have = remote.get(name)
            digest = None
            if have is not None and have.size == size:
                if have.lfs is not None:
                    digest = sha256_file(p)
                    same = digest == have.lfs.sha256
                else:
                    same = size < (10 << 20) and sha.git_hash(p.read_bytes()) == have.blob_id
                if same:
                    result.unchanged.append(name)
                    bar.update(size)
                    continue
            op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(p))
            if digest is not None:
                op.upload_info.sha256 = bytes.fromhex(digest)  # already read once: not hashed again
            additions.append(op)
            result.uploaded.append(name)
            result.uploaded_bytes += size
            bar.update(size)
    for name in sorted(remote):
        if name not in local_names and any(fnmatch.fnmatch(name, pat) for pat in WEIGHT_PATTERNS):
            result.deleted.append(name)
    if not additions and not result.deleted:
        return result

    (say if progress else (lambda msg: None))(
        f"Uploading {len(additions)} file(s), {_size(result.uploaded_bytes)}, to {repo_id} "
        f"({'pull request against ' if create_pr else ''}{target}); {len(result.unchanged)} unchanged"
        + (f"; deleting {len(result.deleted)} stale file(s)" if result.deleted else "")
    )
    operations = [*additions, *(CommitOperationDelete(path_in_repo=n) for n in result.deleted)]
    message = commit_message or f"Upload {directory.name} (llava-convert {__version__})"
    if not progress:
        disable_progress_bars()
    try:
        info = api.create_commit(
            repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr,
        )
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, repo_id, "uploading and committing") from None
    finally:
        if not progress:
            enable_progress_bars()
    result.commit = info.oid
    result.pr_url = info.pr_url
    return result

