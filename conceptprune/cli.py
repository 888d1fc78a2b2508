"""``conceptprune <command>``: one CLI over every stage.

Each stage package registers its subcommands in a light ``cli`` module (argument parsing
only; heavy imports happen when a command runs). Errors in the user's input end with a
one-line reason and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from . import __version__
from .errors import ConceptPruneError
from .progress import ENV as PROGRESS_ENV

# Modules whose ``register(subparsers)`` adds commands, in help order.
COMMAND_MODULES = (
    "conceptprune.data.cli",           # download, embed, reshard
    "conceptprune.filters.cli",        # filter <method>
    "conceptprune.filters.scores_cli", # scores, scores correlate
    "conceptprune.cli_core",           # make-pool, pool, keep-list
    "conceptprune.training.cli",       # train
    "conceptprune.evaluation.cli",     # evaluate, compare
    "conceptprune.slurm.cli",          # cluster
    "conceptprune.apps.scaling_cli",   # scaling
    "conceptprune.apps.demo_cli",      # demo
    "conceptprune.apps.pipeline_cli",  # run
    "conceptprune.report.cli",         # report, explain
)

log = logging.getLogger("conceptprune")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser. Given the command word, only the modules up to the one that registers
    it are imported (start-up time: a ``reshard`` need not import the filters' libraries); a
    word no module registers gets them all, so argparse lists every choice."""
    parser = argparse.ArgumentParser(
        prog="conceptprune",
        description="Concept-based data pruning for the DataComp CLIP benchmark: "
                    "download -> embed -> filter -> reshard -> train -> evaluate -> compare.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'conceptprune <command> --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"conceptprune {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="logging verbosity (default: info); debug also prints tracebacks")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # stage not part of this build
                continue
            raise
        module.register(sub)
        if command is not None and command in sub.choices:
            break
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(_command_word(sys.argv[1:] if argv is None else argv, before_help=True))
    try:  # numeric flags are checked while parsing (conceptprune.checks): one line, no usage dump
        args = parser.parse_args(argv)
    except ConceptPruneError as e:
        print(f"conceptprune {_command_word(sys.argv[1:] if argv is None else argv)}: error: {_one_line(e)}",
              file=sys.stderr)
        return 2
    # what every command gets on its namespace: the command line its outputs' manifests record
    args.command_line = ["conceptprune", *(sys.argv[1:] if argv is None else argv)]
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every CPU-feature probe
    for noisy in ("matplotlib", "PIL"):  # --log-level debug is for our steps, not matplotlib's font search
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))
    progress_before = os.environ.get(PROGRESS_ENV)
    if args.quiet:  # read by every progress bar, here and in the worker processes this command starts
        os.environ[PROGRESS_ENV] = "0"
    try:
        rc = args.func(args)
        return int(rc or 0)
    except ConceptPruneError as e:
        if args.log_level == "debug":
            traceback.print_exc()
        print(f"conceptprune {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"conceptprune {args.command}: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: one line, traceback on request
        if args.log_level == "debug":
            traceback.print_exc()
        print(f"conceptprune {args.command}: error: {type(e).__name__}: {_one_line(e)} "
              "(--log-level debug shows the traceback)", file=sys.stderr)
        return 1
    finally:
        if args.quiet:  # a later call in this process decides for itself
            _restore_env(PROGRESS_ENV, progress_before)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _one_line(e: BaseException) -> str:
    """An error message on one line (library messages, e.g. Arrow's, may hold newlines)."""
    return " ".join(str(e).split())


def _command_word(argv: list[str], before_help: bool = False) -> str | None:
    """The subcommand of a command line (skips the global options); "" when there is none.
    ``before_help``: None when a help or version flag comes first (the whole CLI answers it)."""
    skip = False
    for tok in argv:
        if skip:
            skip = False
        elif tok == "--log-level":
            skip = True
        elif before_help and tok in ("-h", "--help", "--version"):
            return None
        elif not tok.startswith("-"):
            return tok
    return None if before_help else ""


if __name__ == "__main__":
    sys.exit(main())
