"""`llava-convert push` and the `--push-to-hub` options `convert` shares (implemented in publish.py).

Kept light: huggingface_hub is imported inside the commands, so `llava-convert --help` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

_PATH = click.Path(path_type=Path)


def hub_options(revision_flag: str):
    """--private, the branch, --create-pr, --commit-message, --token; `revision_flag` names the branch option
    (`convert` already has a --revision, for its SOURCE)."""

    def deco(f):
        opts = [
            click.option("--private", is_flag=True, help="Create the Hub repo private (when it does not exist yet)."),
            click.option(revision_flag, "push_revision", default=None, metavar="BRANCH",
                         help="Branch to commit to (created when missing); with --create-pr, the PR's target."),
            click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch."),
            click.option("--commit-message", default=None, metavar="MSG", help="Title of the commit."),
            click.option("--token", default=None, metavar="TOKEN",
                         help="Hub token (default: HF_TOKEN, then the saved login); never printed or written."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f

    return deco


def command_line() -> str | None:
    """The command as typed (token removed), when this process is the llava-convert command; else None."""
    from .card import redact_command

    if Path(sys.argv[0]).name not in ("llava-convert", "cli.py", "__main__.py"):
        return None
    return redact_command(["llava-convert", *sys.argv[1:]])


def run_push(directory: Path, repo_id: str, *, private, push_revision, create_pr, commit_message, token, quiet):
    from .publish import push as do_push

    result = do_push(
        directory, repo_id, private=private, revision=push_revision, create_pr=create_pr,
        commit_message=commit_message, token=token, progress=not quiet,
    )
    click.echo(result.summary())
    return result


@click.command()
@click.argument("output", type=_PATH)
@click.argument("repo_id")
@hub_options("--revision")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def push(output, repo_id, private, push_revision, create_pr, commit_message, token, quiet):
    """Publish the converted directory OUTPUT to the Hub repo REPO_ID (namespace/name), with its model card.

    Only files the repo lacks or has with other content are uploaded; re-running an interrupted push resumes it.
    Exit status: 0 pushed (or nothing to push), 2 refused (not a complete conversion, no token, a token that
    cannot write), 3 the transfer failed (re-run to resume).
    """
    run_push(output, repo_id, private=private, push_revision=push_revision, create_pr=create_pr,
             commit_message=commit_message, token=token, quiet=quiet)
