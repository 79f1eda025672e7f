"""`svdllm` command line: compress a model with a recipe, evaluate, generate from or export a folder.

Importing this package is cheap (no torch, no llmcompressor): help and argument errors answer at
once, and each command imports what it needs when it runs. Every failure ends in one line on
stderr (``svdllm CMD: error: ...``) and a non-zero exit; ``--debug`` or ``SVDLLM_DEBUG=1`` adds
the traceback (the contract lives in ``svdllm_plugin/cli/contract.py``). stdout carries only
results (the table, the JSON); logs go to stderr.

A command is a module with ``add_parser(subparsers)`` and ``run(args) -> str | None``: ``run``
returns the text for stdout, anything it prints itself goes to stderr. A module joins the command
line by being named in ``COMMAND_MODULES``, the one registry (one module per command, the work in
library functions the command calls).
"""

from __future__ import annotations

import argparse
import importlib

from svdllm_plugin.cli.contract import Parser, debug_flag, error_message, run_command

__all__ = ["main", "build_parser", "error_message", "COMMAND_MODULES"]

# modules with add_parser(subparsers) and run(args); keep them light to import
COMMAND_MODULES: tuple[str, ...] = (
    "svdllm_plugin.cli.compress",
    "svdllm_plugin.cli.eval",
    "svdllm_plugin.cli.generate",
    "svdllm_plugin.cli.export_gptq",
    "svdllm_plugin.cli.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="svdllm", description=__doc__.split("\n\n")[0], parents=[debug_flag()])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.add_parser(sub).set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))
