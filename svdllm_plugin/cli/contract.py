"""The `svdllm` stdout/error contract: results on stdout, logs on stderr, every failure one line.

``run_command(args)`` runs ``args.run(args)`` and prints its text on stdout; whatever the library
prints meanwhile goes to stderr. A failure is one line on stderr (``svdllm CMD: error: ...``) and
exit 2, an interrupt exit 130; ``--debug`` or ``SVDLLM_DEBUG=1`` adds the traceback. argparse
errors are one line too (``Parser``), and the integer argument types say what they expect.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path

__all__ = ["Parser", "int_at_least", "POSITIVE", "debug_flag", "run_command", "error_message"]

_CLI_DIR = Path(__file__).resolve().parent
_PACKAGE_DIR = _CLI_DIR.parent


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (with where to look), not the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def int_at_least(minimum: int, note: str = ""):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}{note}; got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


POSITIVE = int_at_least(1)


def debug_flag() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of a failure (or set SVDLLM_DEBUG=1)",
    )
    return common


# ---------------------------------------------------------------- the command line


def _debug_wanted(args) -> bool:
    return getattr(args, "debug", False) or os.environ.get("SVDLLM_DEBUG", "").lower() not in (
        "",
        "0",
        "false",
    )


def _logs_to_stderr(debug: bool) -> None:
    """loguru to stderr only; llmcompressor points it at stdout when it loads, so redo it then."""
    from loguru import logger

    from svdllm_plugin._imports import when_imported

    level = "DEBUG" if debug else "INFO"
    fmt = "{time:YYYY-MM-DDTHH:mm:ss} | {level} | {message}"

    def configure():
        llmcompressor_logger = sys.modules.get("llmcompressor.logger")
        logger.remove()
        logger.add(
            sys.stderr,
            level=level,
            format=fmt,
            filter=getattr(llmcompressor_logger, "support_log_once", None),
        )

    configure()
    when_imported("llmcompressor.logger", configure)
    # bitsandbytes warns at import that an optional CPU kernel package is missing: noise for a user
    logging.getLogger("bitsandbytes").setLevel(logging.NOTSET if debug else logging.ERROR)


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command under the contract; the exit code (0, 2 or 130)."""
    debug = _debug_wanted(args)
    stdout = sys.stdout
    try:
        _logs_to_stderr(debug)
        with contextlib.redirect_stdout(sys.stderr):  # whatever a library prints is not a result
            result = args.run(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"svdllm {args.command}: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001  (every failure becomes one line)
        if debug:
            traceback.print_exc()
        print(f"svdllm {args.command}: error: {error_message(error)}", file=sys.stderr)
        return 2
    if result is not None:
        print(result, file=stdout)
    return 0


# ---------------------------------------------------------------- one-line messages


def _raised_by_us(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    file = Path(tb.tb_frame.f_code.co_filename).resolve()
    return _PACKAGE_DIR in file.parents and _CLI_DIR not in file.parents


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _validation_message(error) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(x) for x in e.get("loc", ()))
        msg = e.get("msg", "").removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return f"{error.title}: " + "; ".join(parts)


def error_message(error: BaseException) -> str:
    """One line saying what is wrong and what to do.

    The plugin's own errors name the file or option and the fix: the outermost of them in the
    ``raise ... from`` chain is kept (it has the context: file name, line). Errors that come
    only from libraries (llmcompressor wraps the error of a modifier) give their innermost
    cause, and unexpected ones say how to see the traceback.
    """
    chain = [error]
    while chain[-1].__cause__ is not None and chain[-1].__cause__ not in chain:
        chain.append(chain[-1].__cause__)
    ours = next((e for e in chain if _raised_by_us(e) and str(e)), None)
    if ours is not None:
        return _one_line(str(ours))
    inner = next((e for e in reversed(chain) if str(e)), error)
    if type(inner).__name__ == "ValidationError" and hasattr(inner, "errors"):
        return _one_line(_validation_message(inner))
    if type(inner).__module__.startswith("safetensors") or "SafetensorError" in type(inner).__name__:
        return (
            f"a safetensors file cannot be read ({_one_line(str(inner))}); the checkpoint is truncated or "
            "corrupted: re-save or re-download it"
        )
    if isinstance(inner, (ValueError, OSError, RuntimeError)):
        return _one_line(str(inner))
    return (
        f"{type(inner).__name__}: {_one_line(str(inner))} (unexpected; rerun with --debug for the traceback)"
    )
