"""Up-front checks of command-line inputs, run before any expensive work.

Output locations must be creatable and writable, `--model` must be an intact local model folder or a reachable
Hub repo id, and Hub commands check offline mode and credentials first. Every failure is a one-line
`ValueError` / `FileNotFoundError` / `PermissionError` saying what was wrong and how to fix it.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

# Safetensors layout: an 8-byte little-endian header length, the JSON header, then the tensor data.
_SAFETENSORS_LENGTH_BYTES = 8
_MAX_SAFETENSORS_HEADER = 100 << 20


def check_output_location(path, option: str = "--out") -> None:
    """Raise unless `path` (a file or folder to write) can be created or replaced by this process.

    Probes the nearest existing folder by creating and removing a temporary file in it, so read-only mounts and
    missing permissions are caught as well as a path that goes through a file.
    """
    target = Path(path).expanduser().absolute()
    if target.exists() and target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {path} is not writable; choose a folder you can write to or fix its "
                              "permissions (chmod u+w)")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{option} {path} goes through {ancestor}, which is a file, not a folder; choose another "
                         f"{option}")
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".shirg-write-check-", dir=ancestor)
    except OSError as error:
        raise PermissionError(f"{option} {path}: cannot write in {ancestor} ({error.strerror}); choose a writable "
                              f"location for {option}") from None
    os.close(descriptor)
    os.remove(probe)


def looks_like_local_path(value: str) -> bool:
    """True if `value` is meant as a path: it starts with ./ ../ / ~, has more than one separator, uses a
    backslash, or its first component exists here. A Hub repo id is exactly `owner/name`."""
    if value.startswith(("./", "../", "/", "~", ".\\", "..\\")) or value in (".", ".."):
        return True
    if "\\" in value or os.sep != "/" and os.sep in value or value.count("/") > 1:
        return True
    first = value.split("/")[0]
    return "/" in value and os.path.exists(first)


def check_model_files(folder: Path, option: str = "--model") -> None:
    """Raise unless `folder` has a valid `config.json` and every `*.safetensors` file in it is complete."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{option} {folder} has no config.json; pass a save_pretrained folder (from "
                                "`shirg-hf demo --out`, `convert-lavida` or `export`)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({error}); restore it from the saved model or re-save "
                         "the model with save_pretrained") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{config_path} has no 'model_type'; it is not a transformers config. Restore it or "
                         "re-save the model with save_pretrained")
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors_file(weights)


def check_safetensors_file(path: Path) -> None:
    """Raise `ValueError` if `path` is not a complete safetensors file (e.g. cut off by an interrupted copy)."""
    size = path.stat().st_size
    hint = "it is truncated or corrupt; copy or download it again, or re-save the model"
    with open(path, "rb") as stream:
        head = stream.read(_SAFETENSORS_LENGTH_BYTES)
        if len(head) < _SAFETENSORS_LENGTH_BYTES:
            raise ValueError(f"{path} has {size} bytes, too few for a safetensors file: {hint}")
        (header_length,) = struct.unpack("<Q", head)
        if header_length > min(_MAX_SAFETENSORS_HEADER, size - _SAFETENSORS_LENGTH_BYTES):
            raise ValueError(f"{path} declares a {header_length}-byte header in a {size}-byte file: {hint}")
        try:
            header = json.loads(stream.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path} has an unreadable safetensors header: {hint}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} has an unreadable safetensors header: {hint}")
    data_end = max((entry["data_offsets"][1] for name, entry in header.items()
                    if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry), default=0)
    expected = _SAFETENSORS_LENGTH_BYTES + header_length + data_end
    if size < expected:
        raise ValueError(f"{path} has {size} bytes but its header describes {expected}: {hint}")


def check_model_source(value: str, option: str = "--model", hub: bool = True) -> None:
    """Raise unless `value` is an intact local model folder or (with `hub`) a Hub repo id that can be loaded now.

    A value that looks like a path (see `looks_like_local_path`) or is not a repo id must exist locally: it is
    never sent to the Hub, so a typo fails at once instead of after a network timeout.
    """
    from .hub import is_hub_repo_id

    path = Path(value).expanduser()
    if path.is_dir():
        check_model_files(path, option)
        return
    if path.exists():
        raise ValueError(f"{option} {value} is a file; pass the model's save_pretrained folder")
    if not hub or looks_like_local_path(value) or not is_hub_repo_id(value):
        hub_hint = " or a Hub repo id (owner/name)" if hub else ""
        raise FileNotFoundError(f"{option} {value}: no such folder; pass a save_pretrained folder{hub_hint}")
    check_hub_repo(value, option)


def check_hub_repo(repo_id: str, option: str = "--model") -> None:
    """Raise a one-line error if the Hub repo `repo_id` cannot be loaded now (offline, unreachable, missing, gated).

    In offline mode (HF_HUB_OFFLINE=1) the repo must already be in the local cache; online, its metadata is
    fetched once (a failure to connect is accepted when the repo is cached, as transformers then uses the cache).
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    if constants.is_offline_mode():
        if cached:
            return
        raise ValueError(f"{option} {repo_id} is not in the local Hub cache and HF_HUB_OFFLINE is set; unset "
                         "HF_HUB_OFFLINE to download it, or pass a local save_pretrained folder")
    try:
        HfApi().model_info(repo_id, timeout=30)
    except GatedRepoError:
        raise ValueError(f"{option} {repo_id} is a gated repo: request access on its Hub page, then log in "
                         "(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{option} {repo_id} was not found on the Hub at {constants.ENDPOINT} (or it is private "
                         "and you are not logged in): check the repo id, or log in with `hf auth login` / "
                         "HF_TOKEN") from None
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status in (401, 403):
            raise ValueError(f"{option} {repo_id}: the Hub refused your credentials (HTTP {status}); log in again "
                             "with `hf auth login` or set a valid HF_TOKEN") from None
        raise ValueError(f"{option} {repo_id}: the Hub answered HTTP {status}; try again later or pass a local "
                         "folder") from None
    except (OSError, _hub_transport_error()) as error:
        if not cached:
            raise ValueError(f"{option} {repo_id}: cannot reach the Hub at {constants.ENDPOINT} "
                             f"({type(error).__name__}: {error}); check the network, or pass a local save_pretrained "
                             "folder") from None


def _hub_transport_error() -> type:
    """The connection/timeout error class of the HTTP client huggingface_hub uses (httpx, or httpx2 in newer ones)."""
    import importlib

    from huggingface_hub import get_session

    return importlib.import_module(type(get_session()).__module__.split(".")[0]).TransportError


def check_hub_upload(option: str = "REPO_ID") -> None:
    """Raise a one-line error unless an upload to the Hub can start: not offline, and a token is configured."""
    from huggingface_hub import constants, get_token

    if constants.is_offline_mode():
        raise ValueError(f"uploading to {option} needs the network but HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE")
    if get_token() is None:
        raise ValueError("no Hugging Face token found: log in with `hf auth login` or set HF_TOKEN (a token with "
                         "write access)")


__all__ = [
    "check_hub_repo",
    "check_hub_upload",
    "check_model_files",
    "check_model_source",
    "check_output_location",
    "check_safetensors_file",
    "looks_like_local_path",
]
