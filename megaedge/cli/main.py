"""``megaedge`` entry point: argparse subcommands registered from one list.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``. Modules import
only the standard library at import time, so ``--help`` works for every command even when its extra is missing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from megaedge import __version__
from megaedge.errors import MegaedgeError

COMMANDS = (
    "megaedge.cli.doctor",
    "megaedge.cli.merge",
    "megaedge.cli.export",
    "megaedge.cli.transcribe",
    "megaedge.cli.stream",
    "megaedge.cli.serve",
    "megaedge.cli.bench",
    "megaedge.cli.prepare",
    "megaedge.cli.plan",
    "megaedge.cli.build_engines",
    "megaedge.cli.eval",
    "megaedge.cli.reference",
    "megaedge.cli.make_test_model",
    "megaedge.cli.calibrate",
)


class _UsageError(Exception):
    """A bad command line, raised by the parser instead of argparse's usage dump and exit status 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block and exits 2; megaedge's rule for every error the user can fix is one
    # line and exit 1, and main() must return (not exit) so callers in-process get the status.
    argv: list[str] = []  # the command line being parsed, for the hint below

    def error(self, message: str):
        if message.endswith("expected one argument"):  # `--memory -1GB`: argparse took the value for an option
            names = message.split(":", 1)[0].removeprefix("argument ").split("/")
            given = [i for i, arg in enumerate(self.argv[:-1])  # a value like -1GB or -.5, not a forgotten value
                     if arg in names and re.match(r"-\.?\d", self.argv[i + 1])]
            if given:
                option, value = self.argv[given[0]], self.argv[given[0] + 1]
                message += f"; a value that starts with '-' goes after '=': {option}={value}"
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="megaedge",
        description="Mega-ASR on edge devices: export, quantize, run, stream and benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"megaedge {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS:
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(module.NAME, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        module.add_arguments(cmd)
        # the global options after the command too (`megaedge export --no-progress ...`); given there they win
        cmd.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        cmd.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command (argv, default sys.argv[1:]); returns the exit status. Safe to call in-process."""
    return _main(argv)


def console() -> int:
    """The `megaedge` console command: main(), then Ctrl-C is ignored while the interpreter exits. The command is
    done (or was interrupted and said so); a Ctrl-C now would land in the interpreter's clean-up (a temporary
    folder's or a library's finalizer) and print "Exception ignored ..." with a trace. Only the console command
    does this: a program that calls main() keeps its own Ctrl-C."""
    try:
        return _main(None)
    finally:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        _Parser.argv = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return 1
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    from megaedge.progress import set_progress, setup_logging

    setup_logging(args.verbose)
    if args.no_progress:
        set_progress(False)
    try:
        return int(args._run(args) or 0)
    except MegaedgeError as exc:
        print(f"megaedge {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"megaedge {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_is_closed():
            raise  # a pipe or socket of the command's own: not the reader of its output going away
        # whatever read our output stopped reading (`| head -1`): stop quietly, as other command-line tools do;
        # stdout goes to /dev/null so the interpreter's last flush cannot fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:
        # the machine said no (a folder that cannot be made, a disk full, a file a library could not find): one
        # line with the path, as megaedge's own checks give; -vv logs the trace
        import logging

        logging.getLogger("megaedge.cli").debug("command failed", exc_info=True)
        if exc.strerror:
            message = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
        else:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"megaedge {args.command}: error: {message}", file=sys.stderr)
        return 1


def _stdout_is_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (poll reports an error on it; writing nothing
    would prove nothing, writing something would add to the output)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no real descriptor (captured output), or no poll here
        return False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console())
