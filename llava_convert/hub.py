"""Hub repo ids for SOURCE, `--base` and `--vision-tower`, resolved with huggingface_hub.

A local directory always wins; otherwise `org/name` (optionally `org/name@revision`) is fetched with
`snapshot_download`, asking only for the files a conversion reads (`allow_patterns`): the small metadata
files first, then the weight files they call for (the shards an index names, or the one weights file).
huggingface_hub itself honours `HF_HUB_OFFLINE` and the local cache: offline, a cached snapshot is used
and nothing is fetched.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, get_cached_repo_tree, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import LlavaConvertError
from .readers import WEIGHT_INDEX_NAMES, WEIGHT_SINGLE_NAMES

# `org/name`, Hub rules (letters, digits, `-`, `_`, `.`), optionally `@revision`. A path that exists locally is
# never taken for a repo id.
_REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(@(?P<rev>[\w./-]+))?")

# Everything but the big weight files: configs, index files, tokenizer, and the small weight files that tell
# the forms apart (a LoRA adapter, a LoRA run's non_lora_trainables.bin, a pretrain run's mm_projector.bin).
CHECKPOINT_METADATA = (
    "*.json",
    "tokenizer.model",
    "*.tiktoken",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "non_lora_trainables.bin",
    "mm_projector.bin",
    "README.md",  # its metadata's license goes into the conversion's model card
)
TOWER_METADATA = ("config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class Located:
    """Where a SOURCE / --base / --vision-tower argument lives on disk."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None


def parse_repo_id(spec: str) -> tuple[str, str | None] | None:
    """`(repo_id, revision)` when SPEC has the shape of a Hub repo id, else None."""
    m = _REPO_ID.fullmatch(spec)
    if not m:
        return None
    return m.group("repo"), m.group("rev")


def locate(
    spec: str | Path,
    *,
    revision: str | None = None,
    role: str = "SOURCE",
    tower: bool = False,
    weights: bool = True,
) -> Located:
    """A local directory as it is, or the snapshot folder of a Hub repo with the files a conversion needs.

    Args:
        spec: a local directory, or a repo id `org/name` (`org/name@revision`).
        revision: branch, tag or commit; overrides an `@revision` in SPEC.
        role: how errors name the argument ("SOURCE", "--base", "--vision-tower").
        tower: SPEC is a CLIP tower: fetch only its config, image-processor config (and weights).
        weights: also fetch the weight files (the metadata alone is enough for a tower whose weights are
            carried by the checkpoint).

    Returns:
        A `Located` with the directory and, for Hub repos, the repo id and revision.

    Raises:
        LlavaConvertError: not a local directory and not resolvable on the Hub or in the cache.

    Example:
        >>> locate("liuhaotian/llava-v1.5-7b").path  # doctest: +SKIP
        PosixPath('/root/.cache/huggingface/hub/models--liuhaotian--llava-v1.5-7b/snapshots/...')
    """
    text = str(spec)
    path = Path(spec)
    if path.exists():
        return Located(path)
    parsed = parse_repo_id(text)
    if parsed is None:
        raise LlavaConvertError(f"{'' if role == 'SOURCE' else role + ' '}{text}: no such directory")
    repo_id, rev = parsed
    rev = revision or rev
    snapshot = _snapshot(repo_id, rev, TOWER_METADATA if tower else CHECKPOINT_METADATA, role)
    if weights and not _has_small_form_files(snapshot):
        patterns = weight_patterns(repo_id, rev, snapshot)
        if patterns:
            snapshot = _snapshot(repo_id, rev, patterns, role)
    return Located(snapshot, repo_id, rev)


def cached_snapshot(path: Path | str) -> tuple[str, str] | None:
    """`(org/name, commit)` when PATH is, or lies in, a snapshot folder of the Hugging Face cache
    (`.../models--org--name/snapshots/<sha>[/file]`), read as huggingface_hub names its cache folders; else
    None. The path as given is tried, then resolved."""
    for parts in (Path(path).absolute().parts, Path(path).resolve().parts):
        for i in range(len(parts) - 2, 0, -1):
            if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
                repo = parts[i - 1][len("models--") :].replace("--", "/")
                if parse_repo_id(repo):
                    return repo, parts[i + 1]
    return None


def cached_repo_id(path: Path | str) -> str | None:
    """`org/name` when PATH is a snapshot folder of the Hugging Face cache, else None (`cached_snapshot`)."""
    path = Path(path)
    found = cached_snapshot(path)
    # The snapshot folder itself, not a file or folder inside it.
    if found and (path.absolute().parent.name == "snapshots" or path.resolve().parent.name == "snapshots"):
        return found[0]
    return None


def _has_small_form_files(snapshot: Path) -> bool:
    """LoRA and projector-only repos carry no full weights: the metadata pass fetched all they hold."""
    if (snapshot / "adapter_config.json").is_file():
        return True
    return (snapshot / "mm_projector.bin").is_file() and not any(
        (snapshot / n).is_file() for n in (*WEIGHT_INDEX_NAMES, *WEIGHT_SINGLE_NAMES)
    )


def _repo_files(repo_id: str, revision: str | None, snapshot: Path) -> set[str]:
    """The repo's file list from huggingface_hub's cached tree listing, else what the snapshot holds."""
    try:
        return {f.path for f in get_cached_repo_tree(repo_id, revision=revision)}
    except Exception:  # noqa: BLE001 - no cached listing (offline, hand-made cache): look at the folder
        return {str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()}


def weight_patterns(repo_id: str, revision: str | None, snapshot: Path) -> list[str]:
    """The weight files to fetch: the shards an index names, else the single weights file, preferring safetensors."""
    files = _repo_files(repo_id, revision, snapshot)
    for index in WEIGHT_INDEX_NAMES:
        if (snapshot / index).is_file():
            try:
                return sorted(set(json.loads((snapshot / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise LlavaConvertError(f"{repo_id}: unreadable {index} ({e})") from None
    for single in WEIGHT_SINGLE_NAMES:
        if single in files:
            return [single]
    return []


def _snapshot(repo_id: str, revision: str | None, patterns, role: str) -> Path:
    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns)))
    except RevisionNotFoundError:
        raise LlavaConvertError(f"{role} {repo_id}: the Hub repo has no revision {revision!r}") from None
    except GatedRepoError:
        raise LlavaConvertError(
            f"{role} {repo_id}: the Hub repo is gated; accept its terms on the Hub and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise LlavaConvertError(
            f"{role} {repo_id}: neither a local directory nor a Hub repo you can access"
        ) from None
    except IncompleteSnapshotError as e:
        raise LlavaConvertError(f"{role} {repo_id}: {str(e).split('. ')[0]}") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the Hub could not be reached"
        raise LlavaConvertError(
            f"{role} {repo_id}: not a local directory, and no cached snapshot of this Hub repo{at} "
            f"({why}); download it first or pass a local directory"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LlavaConvertError(f"{role} {repo_id}{at}: cannot fetch from the Hub ({msg})") from None
