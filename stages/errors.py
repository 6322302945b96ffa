"""The command line's error boundary: an error ends a command with one line on stderr, never a traceback
(`--debug`, or REGIONCLIP_DEBUG=1, which the stage processes of `regionclip run` inherit, prints it).

    code = exit_code_for(err, debug)      # prints `error: <what went wrong>` and returns 1

What a user can cause (a bad setting, file or folder, a refused checkpoint, a disk that is full, a run
folder in use or damaged) reads as its own message: the errors this project raises say what to fix, and
an OSError, a JSON or Arrow error says which file. An error that escaped a Ray task or Ray Data actor is
unwrapped to the one the task raised (Ray's own message is the remote traceback). Anything else is a
bug: still one line, naming its type and asking for the traceback.
"""
from __future__ import annotations

import errno
import json
import os
import re
import sys
import traceback
from typing import Optional

DEBUG_ENV = "REGIONCLIP_DEBUG"
OURS = ("pipeline", "stages", "trainer")
MAX_CHARS = 600

# errno -> what to do, for the OSErrors a user meets
OS_HINTS = {
    errno.ENOSPC: "free some space, then run the same command again: it resumes where it stopped",
    errno.EDQUOT: "free some space, then run the same command again: it resumes where it stopped",
    errno.EACCES: "check the permissions of the file or folder",
    errno.EROFS: "the file system is read-only; choose another output_dir",
}


def debug_requested(flag: bool = False) -> bool:
    """Whether tracebacks are shown; a flag given here is passed on to the stage processes of `run`."""
    if flag:
        os.environ[DEBUG_ENV] = "1"
    return os.environ.get(DEBUG_ENV) == "1"


def innermost(err: BaseException) -> BaseException:
    """The error a Ray task raised, for an error Ray wrapped (RayTaskError's `cause`); any other error as
    it is. (Ray Data's UserCodeException keeps the actor's error only as text: `remote_error`.)"""
    seen = set()
    while type(err).__module__.startswith("ray.") and id(err) not in seen:
        seen.add(id(err))
        cause = getattr(err, "cause", None) or err.__cause__
        if not isinstance(cause, BaseException):
            break
        err = cause
    return err


# The line of the remote traceback that ends the actor's own error, in a Ray Data error's text.
CAUSE_SEPARATOR = "The above exception was the direct cause of the following exception:"
ERROR_LINE = re.compile(r"(?P<type>[A-Za-z_][\w.]*): (?P<message>.*)")
ERRNO = re.compile(r"\[Errno (\d+)\]")


def remote_error(err: BaseException) -> Optional[str]:
    """`Type: message` of the error a Ray Data actor raised (its UserCodeException holds only the text of
    the remote traceback), or None."""
    if type(innermost(err)).__name__ != "UserCodeException" or CAUSE_SEPARATOR not in str(err):
        return None
    lines = [line for line in str(err).split(CAUSE_SEPARATOR)[0].splitlines() if line.strip()]
    return lines[-1].strip() if lines and ERROR_LINE.fullmatch(lines[-1].strip()) else None


def is_ours(err: BaseException) -> bool:
    return type(err).__module__.split(".")[0] in OURS


def error_line(err: BaseException) -> str:
    """One line that says what went wrong (see the module doc)."""
    remote = remote_error(err)
    if remote is not None:
        match, number = ERROR_LINE.fullmatch(remote), ERRNO.search(remote)
        if match["type"].split(".")[0] in OURS:
            return _clip(match["message"])
        hint = OS_HINTS.get(int(number[1])) if number else None
        return _clip(remote + (f"; {hint}" if hint else ""))
    err = innermost(err)
    if is_ours(err):
        return _clip(str(err))
    if isinstance(err, OSError) and err.errno is not None:
        where = f": {err.filename}" if err.filename else ""
        hint = OS_HINTS.get(err.errno)
        return _clip(f"{err.strerror or os.strerror(err.errno)}{where}" + (f"; {hint}" if hint else ""))
    if isinstance(err, json.JSONDecodeError):
        return _clip(f"not valid JSON: {err}")
    if _is_arrow(err):
        return _clip(f"{type(err).__name__}: {err} (a damaged Parquet file? `regionclip verify MANIFEST` names "
                     "the damaged files of a run)")
    if _user_caused(err):
        return _clip(f"{type(err).__name__}: {err}")
    return _clip(f"unexpected {type(err).__name__}: {err} (a bug: run again with --debug and report the traceback)")


def _is_arrow(err: BaseException) -> bool:
    try:
        import pyarrow as pa
    except ImportError:
        return False
    return isinstance(err, pa.ArrowException)


def _user_caused(err: BaseException) -> bool:
    """Errors of files and settings: the others are bugs."""
    return isinstance(err, (ValueError, OSError, EOFError, ImportError))


def _clip(text: str) -> str:
    """The message, at most MAX_CHARS long."""
    text = text.strip() or "(no message)"
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS] + " ..."


def exit_code_for(err: BaseException, debug: bool = False) -> int:
    """Print the error (one line; the traceback too under --debug) and return the exit status."""
    if isinstance(err, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    if debug:
        traceback.print_exception(err)
    line = error_line(err)
    if not is_ours(innermost(err)) or remote_error(err) is not None:
        line = " ".join(line.split())
    print(f"error: {line}", file=sys.stderr, flush=True)
    return 1
