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
    "shirg_hf.synth",
    "shirg_hf.compare",
    "shirg_hf.train",
    "shirg_hf.evidence",
)
# Arguments that name something a command writes; checked to be writable before the command runs.
OUTPUT_ARGUMENTS = {"out": "--out", "dst": "DST"}
# Bad input, reported as one line and exit code 2.
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shirg-hf", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv=None) -> int:
    from .validation import check_output_location

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passes_arguments", False):  # e.g. `train`: its own parser (HfArgumentParser) reads the rest
        args.passed_arguments = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        for name, option in OUTPUT_ARGUMENTS.items():
            if getattr(args, name, None) is not None:
                check_output_location(getattr(args, name), option)
        return args.func(args) or 0
    except INPUT_ERRORS as error:
        print(f"shirg-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
