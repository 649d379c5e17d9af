"""The `xdlm-vision` command line: one subcommand per job, each defined in the module of its concept."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Command:
    """A subcommand: the module that defines it and the names of its two functions there."""

    module: str
    help: str
    add_arguments: str = "add_arguments"
    run: str = "run"


# Each module is imported only when its command runs, so `--help` stays fast.
COMMANDS: dict[str, Command] = {
    "bench": Command("xdlm_vision.bench", "measure speed and memory; prints a table and writes JSON"),
    "train-tokenizer": Command("xdlm_vision.training.tokenizer_trainer", "train a VQ tokenizer on images"),
    "encode": Command("xdlm_vision.data.encode", "tokenize images into WebDataset token shards"),
    "train": Command("xdlm_vision.training.trainer", "train the XDLM transformer on token shards; export a pipeline"),
    "fid": Command("xdlm_vision.metrics.fid", "sample a pipeline uniformly over classes; score FID, IS, KID, precision/recall"),
    "train-classifier": Command("xdlm_vision.metrics.classifier", "train the Fashion-MNIST classifier used as an offline feature extractor"),
    "sample": Command("xdlm_vision.sampling", "sample a labelled image grid from a saved pipeline"),
    "demo": Command("xdlm_vision.sampling", "sample a grid from the shipped pipeline and print a quick FID",
                    add_arguments="add_demo_arguments", run="run_demo"),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2), without the usage block."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser(command_name: str | None = None) -> argparse.ArgumentParser:
    """Build the parser; only the named command's options are loaded."""
    parser = OneLineErrorParser(
        prog="xdlm-vision",
        description="Class-conditional image generation with mixed discrete diffusion (XDLM) over VQ tokens.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=command.help, description=command.help)
        if name == command_name:
            module = importlib.import_module(command.module)
            getattr(module, command.add_arguments)(subparser)
    return parser


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.INFO
    if verbose:
        level = logging.DEBUG
    elif quiet:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a user error prints one line to stderr and returns 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command_name = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(command_name if command_name in COMMANDS else None)
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)

    command = COMMANDS[args.command]
    run = getattr(importlib.import_module(command.module), command.run)
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print("xdlm-vision: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as error:
        # User mistakes (bad values, missing or damaged files) get one line, not a traceback.
        logger.debug("command %s failed", args.command, exc_info=True)
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"xdlm-vision {args.command}: error: {message}", file=sys.stderr)
        return 2
