"""`shirg-hf export`: a base model folder + a LoRA adapter -> one Hub-ready, self-contained folder.

Both layouts hold the remote code (`config.json` with `auto_map`, the flat `modeling`/`processing` modules),
safetensors weights, `generation_config.json`, the processor files and a model card (`README.md`) listing the
selection settings, the LoRA settings and the training record:

- `--merge`: the adapter is merged into the weights (`merge_and_unload`); the folder is a plain model that loads
  with `AutoModel.from_pretrained(folder_or_repo, trust_remote_code=True)` and needs no peft.
- without `--merge`: the root is the (re-saved) base model and the adapter sits unmerged in `adapter/`; users load
  the base with `AutoModel` and then `PeftModel.from_pretrained(model, folder_or_repo, subfolder="adapter")`
  (peft stays switchable: `with model.disable_adapter(): ...` gives the base). `AutoModel` alone gives the BASE
  model, which the model card says in bold. The adapter's `base_model_name_or_path` is `--repo-id` (the repo the
  folder is published as, i.e. the base it sits in) or null: never a local path.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .fileio import atomic_folder, check_destination
from .hub import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    MODEL_CARD_NAME,
    is_hub_repo_id,
    read_adapter_config,
)
from .validation import check_hub_upload

ADAPTER_SUBFOLDER = "adapter"
PROCESSOR_CONFIG_NAME = "processor_config.json"
# Optional JSON object next to the adapter saying what it was trained on: "budgets", "dataset" and any other
# settings (shown as extra rows of the model card). Without it the card says "not recorded".
TRAINING_RECORD_NAME = "training_record.json"
NOT_RECORDED = "not recorded"
# Everything the remote code imports (transformers brings tokenizers and safetensors; jinja2 renders the chat
# template; accelerate is needed only for `device_map="auto"`).
RUNTIME_REQUIREMENTS = ("`torch>=2.4`, `transformers>=5.24,<5.30`, `tokenizers`, `safetensors`, `Pillow>=10.0`, "
                        "`numpy`, `jinja2`; `accelerate` for `device_map=\"auto\"`")
CARD_TAGS = ["shirg", "lavida", "llada", "diffusion", "vision-language", "lora"]


# ---- checks (all before any weights are loaded) --------------------------------------------------------------
def read_base_config(base_dir: Path):
    """The `ShirgLavidaConfig` of a base model folder, with a clear error for anything else."""
    from .modeling.configuration_shirg_lavida import ShirgLavidaConfig

    if not base_dir.is_dir():
        raise FileNotFoundError(f"--base {base_dir} is not a folder; pass a save_pretrained folder of a "
                                "ShirgLavida model")
    config_path = base_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--base {base_dir} has no config.json; pass a save_pretrained folder of a ShirgLavida model")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type != ShirgLavidaConfig.model_type:
        raise ValueError(f"--base {base_dir} holds a {model_type!r} model; export takes a "
                         f"{ShirgLavidaConfig.model_type!r} (ShirgLavidaForDiffusionLM) folder")
    if not (base_dir / PROCESSOR_CONFIG_NAME).is_file():
        raise ValueError(
            f"--base {base_dir} has no processor files ({PROCESSOR_CONFIG_NAME}); the exported folder must ship the "
            "processor. Save it into the base folder first: ShirgLavidaProcessor.from_model_config(config, "
            "tokenizer).save_pretrained(base_dir)"
        )
    return ShirgLavidaConfig.from_pretrained(base_dir)


def check_adapter(adapter_dir: Path, config) -> dict:
    """The adapter's config, after checking it is a LoRA adapter whose weights fit a model built from `config`.

    The model is built on the meta device (no memory, no weights), so a mismatch (e.g. an adapter trained for a
    base with other hidden sizes) is reported before the base is loaded.
    """
    import torch

    from .modeling.modeling_shirg_lavida import ShirgLavidaForDiffusionLM
    from .training import check_adapter_matches_model

    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"--adapter {adapter_dir} is not a folder; pass a peft adapter folder")
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        if not (adapter_dir / name).is_file():
            raise ValueError(f"--adapter {adapter_dir} has no {name}; pass a folder written by "
                             "PeftModel.save_pretrained (adapter_config.json + adapter_model.safetensors)")
    adapter_config = read_adapter_config(adapter_dir)
    if adapter_config["peft_type"] != "LORA":
        raise ValueError(f"--adapter {adapter_dir} is a {adapter_config['peft_type']} adapter; export handles LoRA")
    with torch.device("meta"):
        skeleton = ShirgLavidaForDiffusionLM(config)
    check_adapter_matches_model(adapter_dir, skeleton)
    return adapter_config


def read_training_record(adapter_dir: Path) -> dict:
    """The training record saved next to the adapter ({} when there is none)."""
    path = adapter_dir / TRAINING_RECORD_NAME
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); fix or remove it") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(record).__name__}")
    return record


def resolve_card_base(adapter_config: dict, base_repo: str | None) -> str | None:
    """The base model's Hub repo id for the card metadata: `--base-repo`, else the adapter's recorded base if that
    is a repo id (not a local folder), else None (left out of the card)."""
    if base_repo is not None:
        if not is_hub_repo_id(base_repo):
            raise ValueError(f"--base-repo {base_repo!r} is not a Hub repo id; pass owner/name")
        return base_repo
    recorded = adapter_config.get("base_model_name_or_path")
    if recorded and is_hub_repo_id(recorded) and not Path(recorded).exists():
        return recorded
    return None


# ---- model card ----------------------------------------------------------------------------------------------
def usage_snippet(repo: str | None, merged: bool) -> str:
    """Python that loads the exported folder (by its repo id `repo`, when known) and answers a question."""
    lines = [
        "import torch",
        "from PIL import Image",
        "from transformers import AutoModel, AutoProcessor",
        *([] if merged else ["from peft import PeftModel"]),
        "",
        f"repo = {json.dumps(repo)}" if repo else 'repo = "path/to/this/folder"  # or its Hub repo id',
        "model = AutoModel.from_pretrained(repo, trust_remote_code=True)",
        *([] if merged else
          [f"model = PeftModel.from_pretrained(model, repo, subfolder={json.dumps(ADAPTER_SUBFOLDER)})"]),
        "processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)",
        'prompt = processor.build_prompt("What is written on the sign?")  # LaViDa system prompt + <image> + question',
        'inputs = processor(images=[Image.open("image.png")], text=[prompt], return_tensors="pt")',
        "with torch.inference_mode():",
        "    answer_ids = model.generate(**inputs, max_new_tokens=32, block_length=32)",
        "print(processor.batch_decode(answer_ids))",
    ]
    return "\n".join(lines)


def _cell(value) -> str:
    """A markdown table cell: the value as code, or "not recorded"."""
    if value is None or value == "" or value == [] or value == {}:
        return NOT_RECORDED
    text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return "`" + text.replace("|", "\\|").replace("`", "'").replace("\n", " ") + "`"


def build_model_card(config, adapter_config: dict | None = None, record: dict | None = None, merged: bool = True,
                     repo: str | None = None, base_repo: str | None = None) -> str:
    """The README.md of a saved or exported folder: YAML metadata + usage + the vision front end settings, and
    with `adapter_config` the LoRA settings and training record (`record`)."""
    from huggingface_hub import ModelCardData

    metadata = ModelCardData(
        library_name="transformers",
        base_model=base_repo,
        tags=[tag for tag in CARD_TAGS if adapter_config is not None or tag != "lora"] + ([] if merged else ["peft"]),
        pipeline_tag="image-text-to-text",
    )
    selection = config.selection
    model = "LaViDa (SigLIP -> mlp2x_gelu projector -> LLaDA masked-diffusion LM) with SHIRG high-resolution token\n"
    link = "[shirg-hf](https://pypi.org/project/shirg-hf/)"
    if adapter_config is None:
        title = f"SHIRG-LaViDa ({config.vision_mode})"
        intro = f"{model}selection, saved by {link}."
        layout, fine_tuning = "", ""
    else:
        title = f"SHIRG-LaViDa with a LoRA-adapted projector ({'merged' if merged else 'base + adapter'})"
        intro = f"{model}selection and a LoRA fine-tune (targets below), exported by {link}."
        layout = ("The LoRA adapter is **merged** into these weights: this is a plain model, no peft needed.\n\n"
                  if merged else
                  f"**`AutoModel` alone loads the base model**; the LoRA adapter is unmerged in `{ADAPTER_SUBFOLDER}/` "
                  "and is applied with "
                  f"`PeftModel.from_pretrained(model, repo, subfolder=\"{ADAPTER_SUBFOLDER}\")`.\n\n")
        fine_tuning = fine_tuning_table(adapter_config, record)
    body = f"""
# {title}

{intro}
The code ships in this repo (`trust_remote_code=True`). Runtime requirements: {RUNTIME_REQUIREMENTS}{"" if merged
else ", `peft`"}.

{layout}```python
{usage_snippet(repo, merged)}
```

The `image-text-to-text` pipeline takes chat messages (the chat template adds LaViDa's system prompt):
`pipeline("image-text-to-text", model=repo, trust_remote_code=True)(text=[{{"role": "user", "content": [{{"type":
"image", "url": "image.png"}}, {{"type": "text", "text": "What is written on the sign?"}}]}}], max_new_tokens=32)`.

## Vision front end and token selection

| setting | value |
|---|---|
| vision mode | `{config.vision_mode}` |
| high-res input | {config.highres_image_size} px -> {config.num_highres_patches} SigLIP patches |
| selection method | `{selection["method"]}` |
| default budget K | {selection["budget"]} ({"+1 summary token" if selection["summary"] else "no summary token"}) |
| score weights (importance, magnitude, gradient) | {_cell(selection["weights"])} |
| coverage cells | {_cell(selection["coverage_cells"])} |
| seed | {selection["seed"]} |

Pass `shirg_budget=K` to the processor to use another budget; its output carries K to `generate`.
{fine_tuning}"""
    return f"---\n{metadata.to_yaml()}\n---\n{body}"


def fine_tuning_table(adapter_config: dict, record: dict | None) -> str:
    """The "Fine-tuning" section: LoRA settings, budgets, data, and every other recorded number."""
    record = record or {}
    rows = [
        ("LoRA rank r", adapter_config.get("r")),
        ("LoRA alpha", adapter_config.get("lora_alpha")),
        ("LoRA dropout", adapter_config.get("lora_dropout")),
        ("target modules", adapter_config.get("target_modules")),
        ("budgets trained on (K)", record.get("budgets")),
        ("training data", record.get("dataset")),
    ]
    rows += [(key, value) for key, value in sorted(record.items()) if key not in ("budgets", "dataset")]
    lora_table = "\n".join(f"| {name} | {_cell(value)} |" for name, value in rows)
    return f"\n## Fine-tuning\n\n| setting | value |\n|---|---|\n{lora_table}\n"


def build_adapter_card(adapter_config: dict, record: dict | None, base: str) -> str:
    """The README.md of a LoRA adapter folder (`shirg-hf train --output_dir`): its base (Hub id or absolute
    path), how to load it, and the fine-tuning table."""
    from huggingface_hub import ModelCardData

    metadata = ModelCardData(library_name="peft", base_model=base if is_hub_repo_id(base) else None,
                             tags=CARD_TAGS + ["peft"], pipeline_tag="image-text-to-text")
    targets = adapter_config.get("target_modules")  # a regex string or a list of module names
    targets = sorted(targets) if isinstance(targets, (list, tuple, set)) else targets
    body = f"""
# SHIRG-LaViDa projector LoRA

A LoRA adapter (rank {adapter_config.get("r")}, targets {_cell(targets)}) for the
SHIRG-LaViDa model at `{base}`, trained by [shirg-hf](https://pypi.org/project/shirg-hf/) `train`.
Runtime requirements: {RUNTIME_REQUIREMENTS}, `peft`.

```python
from peft import PeftModel
from transformers import AutoModel

model = AutoModel.from_pretrained({json.dumps(base)}, trust_remote_code=True)
model = PeftModel.from_pretrained(model, "path/to/this/folder").merge_and_unload()
```
{fine_tuning_table(adapter_config, record)}"""
    return f"---\n{metadata.to_yaml()}\n---\n{body}"


def write_adapter_card(folder, adapter_config, base: str, record: dict | None) -> None:
    """Replace peft's template README.md of an adapter folder with `build_adapter_card`."""
    settings = adapter_config.to_dict() if hasattr(adapter_config, "to_dict") else dict(adapter_config)
    (Path(folder) / MODEL_CARD_NAME).write_text(build_adapter_card(settings, record, base), encoding="utf-8")


def save_model_folder(model, processor, folder) -> None:
    """`save_pretrained` of the model and its processor into `folder`, plus the model card (README.md)."""
    from .fileio import apply_default_permissions

    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (Path(folder) / MODEL_CARD_NAME).write_text(build_model_card(model.config), encoding="utf-8")
    apply_default_permissions(folder)


def saved_dtype(config):
    """The torch dtype the base folder's weights are stored in (`dtype` of config.json; float32 if absent)."""
    import torch

    dtype = config.dtype or torch.float32
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).removeprefix("torch."))


# ---- export --------------------------------------------------------------------------------------------------
def export_model(
    base_dir,
    adapter_dir,
    out_dir,
    merge: bool,
    overwrite: bool = False,
    repo_id: str | None = None,
    base_repo: str | None = None,
) -> Path:
    """Write the exported folder (see the module docstring) atomically to `out_dir`; returns its path."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoProcessor

    from .modeling.modeling_shirg_lavida import ShirgLavidaForDiffusionLM

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if repo_id is not None and not is_hub_repo_id(repo_id):
        raise ValueError(f"--repo-id {repo_id!r} is not a Hub repo id; pass owner/name (e.g. org/shirg-lavida-ft)")
    check_destination(out_dir.resolve(), overwrite)
    config = read_base_config(base_dir)
    adapter_config = check_adapter(adapter_dir, config)
    record = read_training_record(adapter_dir)
    card_base = resolve_card_base(adapter_config, base_repo)
    card = build_model_card(config, adapter_config, record, merge, repo_id, card_base)
    processor = AutoProcessor.from_pretrained(base_dir)

    with atomic_folder(out_dir, overwrite=overwrite) as staging:
        if merge:
            # The base stays in its saved dtype; only the adapted layers are merged in float32
            # (W + scale * B @ A, rounded once to the saved dtype).
            base = ShirgLavidaForDiffusionLM.from_pretrained(base_dir, dtype="auto")
            adapted = PeftModel.from_pretrained(base, adapter_dir)
            for module in adapted.modules():
                if isinstance(module, LoraLayer):
                    module.get_base_layer().to(torch.float32)
            adapted.merge_and_unload().to(saved_dtype(config)).save_pretrained(staging)
        else:
            ShirgLavidaForDiffusionLM.from_pretrained(base_dir, dtype="auto").save_pretrained(staging)
            adapter_out = staging / ADAPTER_SUBFOLDER
            adapter_out.mkdir()
            shutil.copy2(adapter_dir / ADAPTER_WEIGHTS_NAME, adapter_out / ADAPTER_WEIGHTS_NAME)
            adapter_config = {**adapter_config, "base_model_name_or_path": repo_id}
            (adapter_out / ADAPTER_CONFIG_NAME).write_text(
                json.dumps(adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        processor.save_pretrained(staging)
        (staging / MODEL_CARD_NAME).write_text(card, encoding="utf-8")
    return out_dir


def push_folder(folder: Path, repo_id: str, private: bool) -> str:
    """Upload an exported folder to `repo_id` (created if missing); returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload SHIRG-LaViDa export")
    return str(repo_url)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="merge (or attach) a LoRA adapter into a Hub-ready folder with code, processor and model card",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--base", required=True, metavar="DIR",
                        help="base model folder (save_pretrained of ShirgLavidaForDiffusionLM + its processor)")
    parser.add_argument("--adapter", required=True, metavar="DIR",
                        help="peft LoRA adapter folder (its default adapter, at the folder root)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write (refused if it exists)")
    parser.add_argument("--merge", action="store_true",
                        help="merge the adapter into the weights (default: base at the root + adapter/ sub-folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    parser.add_argument("--repo-id", metavar="REPO",
                        help="Hub repo the folder is published as (owner/name): used in the card's usage code and "
                             "as the unmerged adapter's base_model_name_or_path")
    parser.add_argument("--base-repo", metavar="REPO",
                        help="Hub repo id of the base model, for the card's base_model metadata (default: the "
                             "adapter's recorded base if it is a repo id)")
    parser.add_argument("--push", action="store_true", help="upload the folder to --repo-id afterwards")
    parser.add_argument("--private", action="store_true", help="with --push: create the repo as private")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    if args.push and args.repo_id is None:
        raise ValueError("--push needs --repo-id owner/name (the repo to upload to)")
    if args.push:
        check_hub_upload("--repo-id")
    out_dir = export_model(args.base, args.adapter, args.out, args.merge, args.overwrite, args.repo_id,
                           args.base_repo)
    print(f"exported ({'merged' if args.merge else 'base + adapter/'}): {out_dir.resolve()}")
    if args.push:
        try:
            print(push_folder(out_dir, args.repo_id, args.private))
        except HfHubHTTPError as error:
            print(f"shirg-hf export: error: the Hub refused the upload: {error}", file=sys.stderr)
            return 1
    return 0
