"""`shirg-hf` command line: one sub-command per module; each module exposes `register(subparsers)`."""

import argparse
import contextlib
import importlib
import sys
import warnings

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
VERBOSE_FLAGS = ("-v", "--verbose")


@contextlib.contextmanager
def library_output(verbose: bool):
    """Quiet by default: no transformers / huggingface_hub / datasets progress bars ("Loading weights", "Writing
    model shards"), no library log warnings, and no library warnings the user cannot act on (deprecation
    FutureWarnings raised inside peft / transformers, the DataLoader's pin_memory notice on CPU). `verbose` leaves everything as it is. The previous
    settings are restored on exit. Our own progress bars (eval, compare, train) stay."""
    if verbose:
        yield
        return
    import datasets
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hub_bars, dataset_bars = not hub_utils.are_progress_bars_disabled(), datasets.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning,
                                    module=r"(peft|transformers|accelerate|datasets|torch)(\.|$)")
            warnings.filterwarnings("ignore", message=".*pin_memory.*", category=UserWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
        (hub_utils.enable_progress_bars if hub_bars else hub_utils.disable_progress_bars)()
        (datasets.enable_progress_bars if dataset_bars else datasets.disable_progress_bars)()


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="shirg-hf", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"shirg-hf {__version__}")
    parser.add_argument(*VERBOSE_FLAGS, action="store_true",
                        help="show the libraries' progress bars, logs and warnings (anywhere on the command line)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv=None) -> int:
    from .validation import check_output_location

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(flag in argv for flag in VERBOSE_FLAGS)
    argv = [arg for arg in argv if arg not in VERBOSE_FLAGS]
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passes_arguments", False):  # e.g. `train`: its own parser (HfArgumentParser) reads the rest
        args.passed_arguments = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        for name, option in OUTPUT_ARGUMENTS.items():
            if getattr(args, name, None) is not None:
                check_output_location(getattr(args, name), option)
        with library_output(verbose):
            return args.func(args) or 0
    except INPUT_ERRORS as error:
        print(f"shirg-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
