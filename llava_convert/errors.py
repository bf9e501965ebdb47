"""Exceptions with the exit codes the CLI maps them to."""

from __future__ import annotations

import signal


class LlavaConvertError(Exception):
    """Bad input: a file, key or option the user can fix. The CLI prints it on one line and exits 2."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(one_line(message))


def one_line(message: object) -> str:
    """MESSAGE on one line of printable text: a user reads it in a terminal, CI greps it. Newlines become
    spaces; other control characters (from a hostile file's names) are escaped, not echoed."""
    text = " ".join(str(message).splitlines())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class MappingError(LlavaConvertError):
    """The mapping tables do not account for the checkpoint (unmapped, ambiguous, duplicate or misshapen keys)."""

    def __init__(self, problems: list[str]):
        self.problems = sorted(problems)
        shown = "; ".join(self.problems[:8])
        more = f"; and {len(self.problems) - 8} more" if len(self.problems) > 8 else ""
        super().__init__(f"{len(self.problems)} mapping problem(s): {shown}{more}")


class CheckFailed(Exception):
    """A parity check ran and found disagreement. The CLI exits 1."""

    exit_code = 1


class Interrupted(BaseException):
    """A termination signal (SIGTERM, SIGHUP, SIGINT) arrived. A BaseException, like KeyboardInterrupt, so that
    no `except Exception` swallows it: staging directories are removed on the way out, and the CLI exits 128 + N."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
