"""`shirg-hf` command line: one sub-command per module; each module exposes `register(subparsers)`."""

import argparse
import importlib
import sys

# Each module defines `register(subparsers)`, which adds its sub-command(s) with `set_defaults(func=...)`.
COMMAND_MODULES = (
    "shirg_hf.demo",
    "shirg_hf.conversion",
    "shirg_hf.inference",
    "shirg_hf.hub",
    "shirg_hf.export",
    "shirg_hf.evaluation",
    "shirg_hf.visualize",
    "shirg_hf.train",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shirg-hf", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passes_arguments", False):  # e.g. `train`: its own parser (HfArgumentParser) reads the rest
        args.passed_arguments = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"shirg-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
