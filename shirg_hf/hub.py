"""Hugging Face Hub publishing: `shirg-hf push-adapter DIR REPO_ID` (a peft adapter, pointing at its base by repo id).

The adapter's `adapter_config.json` records `base_model_name_or_path`, which `PeftModel.from_pretrained` and
`AutoModel.from_pretrained(adapter_repo)` use to find the base model. After training it is usually the local folder
the base was loaded from, which is meaningless to anyone else, so `push-adapter` rewrites it (and the model card's
`base_model` metadata) to a Hub repo id in a temporary copy and refuses to publish a local path.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
MODEL_CARD_NAME = "README.md"
# Files of an adapter folder that are published. Anything else (Trainer state, optimizer, pickles) stays local.
ADAPTER_FILE_NAMES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, MODEL_CARD_NAME)


def is_hub_repo_id(name: str) -> bool:
    """True for a well-formed `owner/name` Hub repo id (not a path, not a bare name)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1 or name.startswith((".", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def adapter_folders(adapter_dir: Path) -> list[Path]:
    """The adapter folders to publish: `adapter_dir` itself and any named adapter saved in a sub-folder.

    A multi-adapter `PeftModel.save_pretrained` puts the default adapter at the root and the others in
    `<name>/` sub-folders. Raises a clear error if `adapter_dir` is not a peft adapter folder.
    """
    if not adapter_dir.exists():
        raise FileNotFoundError(f"adapter folder {adapter_dir} does not exist")
    if not adapter_dir.is_dir():
        raise ValueError(f"{adapter_dir} is not a folder; expected a peft adapter folder (PeftModel.save_pretrained)")
    folders = [adapter_dir] + sorted(sub for sub in adapter_dir.iterdir() if (sub / ADAPTER_CONFIG_NAME).is_file())
    for folder in folders:
        missing = [name for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME) if not (folder / name).is_file()]
        if missing:
            hint = (
                " (found adapter_model.bin: re-save with PeftModel.save_pretrained(..., safe_serialization=True);"
                " only safetensors weights are published)"
                if (folder / "adapter_model.bin").is_file()
                else ""
            )
            raise ValueError(
                f"{folder} is not a peft adapter folder: missing {', '.join(missing)}{hint}. Expected the output of "
                "PeftModel.save_pretrained (adapter_config.json + adapter_model.safetensors)."
            )
        read_adapter_config(folder)
    return folders


def read_adapter_config(folder: Path) -> dict:
    """The parsed `adapter_config.json` of `folder`, checked to be a peft config."""
    path = folder / ADAPTER_CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); expected a peft adapter config") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(f"{path} has no 'peft_type'; expected a peft adapter config (PeftModel.save_pretrained)")
    return config


def resolve_base_repo(recorded: str | None, base_repo: str | None) -> str:
    """The Hub repo id the published adapter names as its base.

    `base_repo` (the `--base-repo` option) wins and must be an `owner/name` repo id. Without it the value recorded in
    `adapter_config.json` is kept, but only if it is a repo id and not a local folder (a relative path such as
    `out/base` is well-formed as a repo id too, so a value that exists on disk counts as a path).
    """
    if base_repo is not None:
        if not is_hub_repo_id(base_repo):
            raise ValueError(
                f"--base-repo {base_repo!r} is not a Hub repo id; pass the base model's repo as owner/name "
                "(e.g. --base-repo org/shirg-lavida), not a local path"
            )
        return base_repo
    if not recorded or not is_hub_repo_id(recorded) or os.path.exists(recorded):
        raise ValueError(
            f"the adapter's base_model_name_or_path is {recorded!r}, a local path (or no Hub repo id); users of the "
            "published adapter could not load its base. Pass --base-repo owner/name with the base model's Hub repo"
        )
    return recorded


def retarget_model_card(card_path: Path, old_base: str | None, base_repo: str) -> None:
    """Point the model card's `base_model` metadata (and peft's `base_model:adapter:` tag) at `base_repo`.

    Writes a minimal peft card when the folder has none.
    """
    from huggingface_hub import ModelCard, ModelCardData

    if card_path.is_file():
        card = ModelCard.load(card_path)
    else:
        card = ModelCard.from_template(ModelCardData(library_name="peft"))
    card.data.base_model = base_repo
    adapter_tag = f"base_model:adapter:{base_repo}"
    old_tags = {f"base_model:adapter:{old_base}", adapter_tag}
    card.data.tags = [tag for tag in (card.data.tags or []) if tag not in old_tags] + [adapter_tag]
    card.save(card_path)


def stage_adapter(adapter_dir: Path, staging_dir: Path, base_repo: str | None) -> str:
    """Copy the publishable adapter files of `adapter_dir` into `staging_dir` with the base set to a repo id.

    Returns the base repo id written into the root adapter's `adapter_config.json`.
    """
    resolved_bases = []
    for folder in adapter_folders(adapter_dir):
        config = read_adapter_config(folder)
        recorded = config.get("base_model_name_or_path")
        resolved = resolve_base_repo(recorded, base_repo)
        resolved_bases.append(resolved)
        target = staging_dir / folder.relative_to(adapter_dir)
        target.mkdir(parents=True, exist_ok=True)
        for name in ADAPTER_FILE_NAMES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, target / name)
        config["base_model_name_or_path"] = resolved
        (target / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        retarget_model_card(target / MODEL_CARD_NAME, recorded, resolved)
    return resolved_bases[0]


def push_adapter(
    adapter_dir: str | os.PathLike,
    repo_id: str,
    base_repo: str | None = None,
    private: bool = False,
    revision: str | None = None,
) -> str:
    """Publish a peft adapter folder to `repo_id` on the Hub; returns the repo (or branch) URL.

    The uploaded `adapter_config.json` names `base_repo` (or the recorded base, if it is already a Hub repo id) as
    `base_model_name_or_path`; the local folder is left untouched.
    """
    from huggingface_hub import HfApi

    from .validation import check_hub_upload

    if not is_hub_repo_id(repo_id):
        raise ValueError(f"REPO_ID {repo_id!r} is not a Hub repo id; expected owner/name (e.g. org/shirg-lavida-lora)")
    adapter_dir = Path(adapter_dir)
    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="shirg-adapter-") as staging:
        resolved_base = stage_adapter(adapter_dir, Path(staging), base_repo)
        check_hub_upload()
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            revision=revision,
            commit_message=f"Upload LoRA adapter for {resolved_base}",
        )
    return f"{repo_url}/tree/{revision}" if revision is not None else str(repo_url)


def run_push_adapter(args) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        url = push_adapter(args.adapter_dir, args.repo_id, args.base_repo, args.private, args.revision)
    except HfHubHTTPError as error:
        print(f"shirg-hf push-adapter: error: the Hub refused the upload: {error}", file=sys.stderr)
        return 1
    print(url)
    return 0


def register(subparsers) -> None:
    """Add the `push-adapter` sub-command (`export`, in shirg_hf.export, merges or attaches an adapter)."""
    parser = subparsers.add_parser(
        "push-adapter",
        help="upload a peft LoRA adapter folder to the Hub, pointing at its base model by repo id",
        description=(
            "Upload a peft adapter folder (adapter_config.json + adapter_model.safetensors, as written by "
            "PeftModel.save_pretrained or a Trainer checkpoint) to a Hub repo. base_model_name_or_path in the "
            "uploaded config is set to --base-repo (or kept if it already is a Hub repo id); a local path is refused. "
            "Authentication: HF_TOKEN or `hf auth login`."
        ),
    )
    parser.add_argument("adapter_dir", metavar="DIR", help="peft adapter folder")
    parser.add_argument("repo_id", metavar="REPO_ID", help="target Hub repo, owner/name")
    parser.add_argument("--base-repo", metavar="REPO", help="Hub repo id of the base model (owner/name)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", metavar="BRANCH", help="branch to push to (created if missing; default main)")
    parser.set_defaults(func=run_push_adapter)
