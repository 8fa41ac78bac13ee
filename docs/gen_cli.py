"""Render docs/cli.md from tmpq's own argument parser, so that the command reference never drifts from tmpq/cli.py.

    .venv/bin/python docs/gen_cli.py          # rewrite docs/cli.md
    .venv/bin/python docs/gen_cli.py --check  # exit 1 when docs/cli.md differs from the parser

The text is each command's ``--help`` at a fixed width (argparse otherwise wraps to the terminal), so the file is the
same on every machine running the same Python; tests/test_readme.py checks the committed file against it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

WIDTH = 100  # argparse wraps help to $COLUMNS - 2
OUT = Path(__file__).resolve().parent / "cli.md"

HEADER = """# Command reference

Generated from `tmpq.cli.build_parser()` by `docs/gen_cli.py`; do not edit by hand (a test compares this file with
the parser). Every command prints the same text with `--help`. A user error (a bad option, a missing or damaged
file, a config key out of range) is one line `tmpq: error: ...` naming the culprit, exit status 2.
"""


def _subcommands(parser: argparse.ArgumentParser) -> tuple[dict, dict]:
    """The parser's subcommands ``{name: parser}`` and their one-line helps ``{name: help}``."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help or "" for a in action._choices_actions}
    return dict(action.choices), helps


def render() -> str:
    """The text of docs/cli.md: ``tmpq --help``, an index, then ``tmpq COMMAND --help`` for every command."""
    from tmpq.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH + 2)
    try:
        parser = build_parser()
        commands, helps = _subcommands(parser)
        lines = [HEADER, "| command | what |", "|---|---|"]
        lines += [f"| [`tmpq {name}`](#tmpq-{name}) | {helps.get(name, '')} |" for name in commands]
        lines += ["", "## tmpq", "", "```text", parser.format_help().rstrip(), "```"]
        for name, sub in commands.items():
            lines += ["", f"## tmpq {name}", "", "```text", sub.format_help().rstrip(), "```"]
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write docs/cli.md from tmpq's parser.")
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when docs/cli.md is out of date")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        same = OUT.is_file() and OUT.read_text() == text
        print(f"{OUT}: {'up to date' if same else 'out of date: run python docs/gen_cli.py'}")
        return 0 if same else 1
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
