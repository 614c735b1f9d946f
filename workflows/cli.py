"""The ``ciae`` command: one subcommand per pipeline stage.

Each subcommand lives in ``workflows/commands/<name>.py`` with ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``; heavy imports (torch, Ray, MLflow) happen inside ``run``, and only the
invoked subcommand's ``add_arguments`` runs, so that ``ciae --help`` stays instant. Defaults
come from the functions and job classes the commands call (``workflows.commands.defaults``),
never from a second copy in a command.

A user's mistake (a bad option, path, file or model) ends the command with one line,
``ciae <command>: <what is wrong>``, and exit status 2; ``--debug`` shows the traceback instead.
A job that stops because the cluster lost what it holds (a node gone for good), or because its
storage kept failing through every retry (an ``OSError``: S3 answering 503 SlowDown, 500 or
nothing, ``pipeline.data.storage``'s retries spent), ends the same way with status 3: running it again
resumes it. An error raised in a Ray task, actor or Ray Train worker is told as raised there
(``root_error``), not as the traceback Ray wraps it in.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys

from pipeline.cluster.ray_runtime import ClusterShrank

COMMANDS = ("synth", "prepare", "train", "evaluate", "label", "export", "review", "demo")
EXIT_USER_ERROR = 2
EXIT_CLUSTER = 3        # the cluster lost what a job needs (pipeline.cluster.ray_runtime.ClusterShrank): run it again


# the exceptions that mean bad input rather than a bug: ValueError (the project's RecordError,
# DatasetError, EvaluationError, bad config values), missing or unreadable files
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``ciae`` parser; with ``only``, just that subcommand's (its module alone is imported).
    Without, the subcommands are listed but get no arguments: ``ciae --help`` imports nothing
    that their ``add_arguments`` import to read defaults."""
    parser = _Parser(prog="ciae", description="CIAE panoptic segmentation pipeline: data, training, "
                                              "labeling, evaluation.")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of any error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for name in COMMANDS if only is None else (only,):
        module = importlib.import_module(f"workflows.commands.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if only is not None:
            module.add_arguments(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of any error")
        p.set_defaults(_run=module.run)
    return parser


# the advice Ray Data appends to the message of an error raised in a task
_RAY_DATA_NOTE = re.compile(r"\nFailed to .* after \d+/\d+ attempts \(total backoff .*", re.S)


def one_line(e: BaseException) -> str:
    """The error as one line, naming objects by URI (``pipeline.data.storage.s3_uris``), without
    credentials (``pipeline.data.storage.redact``)."""
    from pipeline.data.storage import redact, s3_uris

    return redact(s3_uris(" ".join(_RAY_DATA_NOTE.sub("", str(e)).split()))) or type(e).__name__


def root_error(e: BaseException) -> BaseException:
    """The error a Ray task, actor or Ray Train worker raised, out of what Ray wraps it in (whose
    text is a traceback): a task's ``RayTaskError`` (its ``cause``; Ray Data raises the UDF's own
    error, ``pipeline.cluster.ray_runtime.connect``), Ray Train's ``WorkerGroupError`` (the first
    worker's failure, itself wrapped with its traceback) and ``ControllerError``; else ``e``."""
    while True:
        inner = (getattr(e, "cause", None) or getattr(e, "controller_failure", None)
                 or next(iter(getattr(e, "worker_failures", {}).values()), None)
                 or getattr(e, "_base_exc", None))       # Ray Train's UserExceptionWithTraceback
        if not isinstance(inner, BaseException):
            return e
        e = inner


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the first word that is not an option names the command (the only top-level option is a flag)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except Exception as e:
        error = root_error(e)
        status = (EXIT_USER_ERROR if isinstance(error, USER_ERRORS)
                  else EXIT_CLUSTER if isinstance(error, (ClusterShrank, OSError)) else None)
        if status is None or getattr(args, "debug", False):
            raise
        print(f"ciae {args.command}: {one_line(error)}", file=sys.stderr)
        return status


def run(argv: list[str] | None = None) -> None:
    """The ``ciae`` process: ``main``, then exit with its status. A job given up on a failing store
    or a shrunk cluster (status 3) can leave threads of Ray Data or pyarrow holding S3 clients,
    and pyarrow's exit handler, finalizing S3 under them, can crash the process after its one
    line (apache/arrow#38352; seen here as SIGSEGV, exit -11 for 3): that exit flushes the
    output and skips the interpreter's exit handlers. Ray is shut down by then (``connect``)."""
    status = main(argv)
    if status == EXIT_CLUSTER:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
