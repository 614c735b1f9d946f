"""The ``ciae`` command: one subcommand per pipeline stage.

Each subcommand lives in ``workflows/commands/<name>.py`` with ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``; heavy imports (torch, Ray, MLflow) happen inside ``run`` so that
``ciae --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("synth", "prepare", "train", "evaluate", "label", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ciae", description="CIAE panoptic segmentation pipeline: data, training, labeling, evaluation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"workflows.commands.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
