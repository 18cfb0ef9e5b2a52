"""One line per user mistake: the error wrapper every command-line entry point runs under.

A user's mistake (a missing file, a misspelt config key, a bad weight file, an impossible
option) is reported as one line `error: …` on stderr and exit status 1 (SystemExit with that
line: Python's own convention), not as a traceback;
`--debug` anywhere on the command line, or SDXL_JAX_DEBUG=1, lets the traceback through.

What counts as a user's mistake: the usual OS errors (OSError and its subclasses:
FileNotFoundError, FileExistsError, NotADirectoryError, ENOSPC…), ValueError (ConfigError,
WeightsError and every validation in the package are ValueErrors) and any exception class
defined in this project (sdxl_jax.*, data_tools.*), also when a library re-raises one of
them as the cause of its own. Anything else is a bug and keeps its traceback. A message from
another library's code gets a pointer to --debug, since it rarely says where it came from.

    @cli.entry_point                   # argparse CLIs (with cli.ArgumentParser, usage errors
    def main(argv=None) -> int: ...    # are one line too); main() reads sys.argv
    cli.run_absl(main)                 # absl/ml_collections CLIs (train.py, build_cache)
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import sys
import traceback
from typing import Callable, Sequence

DEBUG_FLAG = "--debug"
DEBUG_ENV = "SDXL_JAX_DEBUG"
EXIT_ERROR = 1  # a user's mistake, reported in one line
EXIT_USAGE = 2  # a bad command line (argparse's convention)
_OWN_MODULES = ("sdxl_jax", "data_tools", "__main__", "train")
_OWN_FILES = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),)  # the repository


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """Whether tracebacks are wanted: SDXL_JAX_DEBUG=1 or --debug in `argv`."""
    env = os.environ.get(DEBUG_ENV, "").strip().lower()
    return env not in ("", "0", "false", "no") or DEBUG_FLAG in (argv or ())


def _strip_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    rest = [a for a in argv if a != DEBUG_FLAG]
    return rest, debug_requested(argv)


def _is_own(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in _OWN_MODULES


def user_error(exc: BaseException) -> BaseException | None:
    """The user-facing error in `exc`'s chain (itself, or the explicit cause of a library's
    error: `raise … from ours`), else None. An error raised while handling another is not
    followed back: that would hide a bug behind the earlier message."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if _is_own(e):
            return e
        e = e.__cause__
    return exc if isinstance(exc, (OSError, ValueError)) else None


def _raised_here(exc: BaseException) -> bool:
    """True when the innermost frame that raised `exc` is this project's code."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_OWN_FILES) and \
        "site-packages" not in frames[-1].filename


def _text(exc: BaseException) -> str:
    """The message of `exc`, unwrapped from the KeyError repr and nested exception args."""
    while len(exc.args) == 1 and isinstance(exc.args[0], BaseException):
        exc = exc.args[0]
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc) or type(exc).__name__


def one_line(text: str) -> str:
    """Collapse a multi-line message into one line ("; " between its non-empty lines)."""
    return "; ".join(s.strip() for s in str(text).splitlines() if s.strip())


def format_error(exc: BaseException) -> str:
    """`error: …`, one line."""
    msg = one_line(_text(exc))
    if not _is_own(exc) and not _raised_here(exc):
        msg += f" ({type(exc).__name__}; {DEBUG_FLAG} or {DEBUG_ENV}=1 shows where)"
    return f"error: {msg}"


def quiet_library_logs() -> None:
    """Orbax and Grain log every file they touch at INFO through absl (57 lines for one export);
    keep a command's output to its own lines. Called after absl's flags are parsed (its
    --verbosity flag would set the level again)."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)` (argv without the program name and without --debug) and return its
    exit status. A user error exits with its one line: SystemExit("error: …"), which Python
    prints to stderr with status 1, for scripts and in-process callers alike. Library INFO
    logs are quieted first (`quiet_library_logs`)."""
    quiet_library_logs()
    argv, debug = _strip_debug(sys.argv[1:] if argv is None else argv)
    try:
        return int(main(argv) or 0)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as e:
        err = None if debug else user_error(e)
        if err is None:
            raise
        raise SystemExit(format_error(err)) from None


def entry_point(main: Callable[[list[str]], int | None]) -> Callable[..., int]:
    """Decorate a CLI's `main(argv)`: `main()` reads sys.argv, and user errors exit as in `run`."""
    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        return run(main, argv)
    return wrapped


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (`error: …; see --help`) and status 2."""

    def error(self, message: str):
        print(f"error: {self.prog}: {one_line(message)} (see --help)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USAGE)


def check(ok: bool, message: str) -> None:
    """Raise ValueError(message) unless `ok`: a validation that reads as one line."""
    if not ok:
        raise ValueError(message)


# ---- absl / ml_collections ---------------------------------------------------------------------

_DID_YOU_MEAN = re.compile(r"^'?([^'\n]+)'?\s*\n?\s*(Did you mean.*)$", re.S)


def _flag_error(exc: BaseException, argv: Sequence[str]) -> str:
    """One line for a flag-parsing failure, keeping absl's and ml_collections' hints."""
    text = _text(exc)
    m = _DID_YOU_MEAN.match(text.strip())
    if m and not text.startswith("Unknown command line flag"):
        # ml_collections: an override of a key the config does not have
        key, hint = m.group(1), one_line(m.group(2))
        arg = next((a for a in argv if a.startswith("--") and
                    key in re.split(r"[.=]", a[2:].split("=", 1)[0])), None)
        where = f" in {arg}" if arg else ""
        return f"error: unknown config key '{key}'{where}. {hint}"
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    if "Traceback (most recent call last)" in text:  # ml_collections puts a whole trace in
        lines = [lines[0].rstrip(":") + ":", lines[-1]]
    return f"error: {' '.join(lines)} (see --helpshort)"


def _config_file_errors() -> str | None:
    """ml_collections defers a config file that failed to load until the config is read;
    surface it right after parsing, naming the flag."""
    from absl import flags
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    for name in list(flags.FLAGS):
        fl = flags.FLAGS[name]
        if fl.name != name or not isinstance(fl.parser, ConfigFileFlagParser):
            continue
        try:
            fl.value.get("__probe__", None)
        except (OSError, AttributeError) as e:
            cause = e.__cause__ or e
            lines = [s.strip() for s in str(cause).splitlines() if s.strip()]
            return f"error: --{name}: cannot load the config file: {lines[-1] if lines else cause}"
    return None


def absl_flags_parser(argv: list[str]) -> list[str]:
    """absl's flag parser with every failure (absl's own, ml_collections' overrides and config
    files) as one line on stderr and status 2."""
    from absl import flags

    msg = None
    try:
        rest = flags.FLAGS(argv)
    except Exception as e:  # flags.Error, and what ml_collections raises from inside parsing
        if debug_requested():
            raise
        msg = _flag_error(e, argv)
    else:
        msg = _config_file_errors()
    if msg:
        print(msg, file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USAGE)
    return rest


def run_absl(main: Callable[[list[str]], int | None]) -> None:
    """absl.app.run(main) with one-line flag errors and one-line user errors (see `run`)."""
    from absl import app

    argv, debug = _strip_debug(sys.argv)
    if debug:
        os.environ[DEBUG_ENV] = "1"  # seen by absl_flags_parser and run()
    # absl passes argv with the program name; run() hands main the rest
    app.run(lambda args: run(lambda rest: main([args[0], *rest]), args[1:]), argv=argv,
            flags_parser=absl_flags_parser)
