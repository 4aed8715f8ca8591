"""Errors a person can act on, and how the command line reports them.

A user's mistake -- a wrong data root, list file or image, a bad config value, a refused
checkpoint, pre-trained weights that cannot be loaded offline -- raises an error whose message
names the file, line or option at fault and says what to do. ``python train.py`` prints it as
``error: <message>`` on stderr and exits with status 1, without a traceback
(:func:`report_user_errors`; ``GRFT_DEBUG=1`` shows the traceback). Which errors those are
(:func:`is_user_error`): the :class:`UserError` types below (data problems are
``grft_lightning.data.folders.DatasetError``, one of them), and a ``ValueError`` or
``FileNotFoundError`` raised by this package's own code (a check with such a message). Anything
else -- a bug, an error inside torch or Lightning -- keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Iterator

#: ``GRFT_DEBUG=1``: show the traceback of user errors too.
DEBUG_VARIABLE = "GRFT_DEBUG"

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # grft_lightning/


class UserError(Exception):
    """A mistake the user can fix; the message names the file, line or option and what to do."""


class ConfigError(UserError, ValueError):
    """A config value that cannot be used (the message names the option)."""


class CheckpointRefused(UserError, ValueError):
    """A checkpoint that does not belong to this run (another method, budget or backbone)."""


class TrainingDiverged(UserError, FloatingPointError):
    """A non-finite training loss or tuned weight; the message names the step, the last finite
    loss and what to change. No checkpoint of the diverged state is written."""


class RunDirectoryBusy(UserError, RuntimeError):
    """Another live process holds the run directory's lock."""


class WeightsUnavailable(UserError, RuntimeError):
    """Pre-trained weights that cannot be loaded (offline without a local copy, no such tag)."""


def check_choice(option: str, value: object, choices) -> None:
    """A ``ValueError`` ``"<option> must be a, b or c, got 'x'"`` unless ``value`` is one of
    ``choices``: the one wording of a bad choice, for arguments a library caller passes without the
    command line's type check."""
    if value not in choices:
        names = [str(c) for c in choices]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise ValueError(f"{option} must be {listed}, got {value!r}")


def _raised_in_package(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is in this package's source."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)
    except (OSError, ValueError):
        return False


def is_user_error(err: BaseException) -> bool:
    """True for the errors :func:`report_user_errors` prints without a traceback (module docstring)."""
    if isinstance(err, UserError):
        return True
    return isinstance(err, (ValueError, FileNotFoundError)) and _raised_in_package(err)


def user_error(err: BaseException) -> BaseException | None:
    """``err`` if it is a user error, else the first user error it was raised from (jsonargparse
    wraps what a link's function raises in its own ``ValueError``), else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if is_user_error(err):
            return err
        seen.add(id(err))
        err = err.__cause__
    return None


def describe(err: BaseException) -> str:
    """``error: <message>`` (a message of several lines, such as a data error followed by the
    expected folder layout, keeps its further lines as they are)."""
    return f"error: {str(err).strip() or type(err).__name__}"


def condense_parser_error(message: str) -> str:
    """One line from jsonargparse's message for a value it rejects: the option's full key (nested
    ``Parser key`` lines joined, ``init_args`` where a ``class_path`` was read) and the innermost
    reason, e.g. ``model.method.init_args.mode: expected a typing.Literal['row', 'column',
    'auto']. Got value: diag``. A ``class_path`` that cannot be used keeps jsonargparse's reason
    and names the class: ``model.method: module 'grft_lightning.methods' has no attribute 'NoSuch'
    (class_path grft_lightning.methods.NoSuch)``, ``model.method: Option 'rows_per_matrx' is not
    accepted (class_path grft_lightning.methods.GRFT)``. A message without that shape keeps its
    first line."""
    lines = [line.strip().lstrip("- ").strip() for line in message.strip().splitlines()]
    lines = [line for line in lines if line]
    keys: list[str] = []
    reasons: list[str] = []
    given = None
    class_path = None  # a class_path jsonargparse could not use, when no nested key follows it
    other: list[str] = []  # the lines after "Problem with given class_path ...:" that are no key
    for line in lines:
        match = re.match(r'Parser key "([^"]+)"', line)
        if match:
            if class_path is not None:  # a nested key of the class's init_args
                keys.append("init_args")
                class_path, other = None, []
            keys.append(match.group(1))
        elif line.startswith("Problem with given class_path"):
            found = re.match(r"Problem with given class_path '([^']*)'", line)
            class_path = found.group(1) if found else "?"
            other = []
        elif line.startswith("Given value:"):
            given = line.split(":", 1)[1].strip()
        elif line.startswith("Expected") and "NoneType" not in line and not line.startswith("Expected a path"):
            reasons.append(line)
        elif class_path is not None:
            other.append(line)
    if keys and class_path is not None and other and not reasons:
        return f"{'.'.join(keys)}: {other[0]} (class_path {class_path})"
    if not keys or not reasons:
        return lines[0] if lines else message
    reason = reasons[-1]
    reason = reason[0].lower() + reason[1:]
    if given is not None and "value:" not in reason:
        reason += f"; given: {given}"
    return f"{'.'.join(keys)}: {reason}"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


@contextlib.contextmanager
def report_user_errors() -> Iterator[None]:
    """Around a command's entry point: a user error becomes ``error: ...`` on stderr and exit
    status 1, without a traceback (unless ``GRFT_DEBUG=1``); other errors propagate unchanged."""
    try:
        yield
    except Exception as err:
        found = user_error(err)
        if debug_enabled() or found is None:
            raise
        print(describe(found), file=sys.stderr)
        raise SystemExit(1) from None
