"""`--device` and `--dtype` of the commands that run a model: one way to add and resolve them."""

import argparse

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--device` (default `auto`: CUDA when available, else CPU) and `--dtype` (default `auto`: the dtype
    the weights were saved in; float32 for a model built in memory)."""
    parser.add_argument("--device", default="auto",
                        help="torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, mps, ...")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights dtype (default auto: as saved; float32 for a model built in memory)")


def resolve_device(name: str | None = "auto") -> torch.device:
    """The torch device `--device NAME` asks for (`auto`/None: cuda when available, else cpu)."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(name)
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a torch device (e.g. auto, cpu, cuda, cuda:1)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu (or auto)")
    return device


def resolve_dtype(name: str | None = "auto", in_memory: bool = False) -> torch.dtype | str:
    """The `dtype=` for `from_pretrained` (`"auto"` = as saved) or, with `in_memory`, for a model built in memory
    (`auto` = float32)."""
    if name in (None, "auto"):
        return torch.float32 if in_memory else "auto"
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


__all__ = ["DTYPES", "add_device_arguments", "resolve_device", "resolve_dtype"]
