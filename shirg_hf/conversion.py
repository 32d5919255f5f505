"""Convert original LLaDA / LaViDa checkpoints into shirg-hf `save_pretrained` folders.

The LaViDa -> shirg-hf key renaming lives here and only here, as data: one table of `(regex, replacement)` per
model component (`KEY_MAPPINGS`). Tests load the golden weights through `rename_lavida_state_dict`, and
`convert_lavida_checkpoint` (the `shirg-hf convert-lavida SRC DST` command) streams a checkpoint folder one
safetensors shard at a time through the same tables.

Two kinds of SRC folder are recognised from their keys:
- language-model only (`model.transformer.*`): becomes a `LladaForMaskedDiffusion` folder;
- full LaViDa (plus `model.vision_tower.vision_tower.vision_model.*`, `model.mm_projector.{0,2}.*`,
  `model.image_newline`): becomes a `ShirgLavidaForDiffusionLM` folder with its processor.
Renaming never changes tensor data, so each shard is written as a new header followed by a byte copy of the
source shard's data section: memory stays at one copy buffer, whatever the shard size, and dtypes are kept.
"""

import json
import math
import re
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .export import build_model_card
from .fileio import atomic_folder, check_destination
from .hub import MODEL_CARD_NAME
from .modeling.configuration_llada import LladaConfig
from .modeling.configuration_shirg_lavida import SO400M_TRUNCATED, ShirgLavidaConfig
from .modeling.visual_tokens import DEFAULT_SELECTION, LAVIDA_GEOMETRY, lavida_checkpoint_mode, vision_mode_names

# Language model: LLaDA (OLMo-style) names -> Llama-style names. Patterns are anchored on the
# full key: `ff_out` is the MLP down projection inside `blocks.{i}` but the LM head at `model.transformer.ff_out`.
LANGUAGE_MODEL_KEY_MAPPING = (
    (r"^model\.transformer\.wte\.weight$", r"model.embed_tokens.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.(q_proj|k_proj|v_proj)\.weight$", r"model.layers.\1.self_attn.\2.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.attn_out\.weight$", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.weight$", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.up_proj\.weight$", r"model.layers.\1.mlp.up_proj.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_out\.weight$", r"model.layers.\1.mlp.down_proj.weight"),
    (r"^model\.transformer\.ln_f\.weight$", r"model.norm.weight"),
    (r"^model\.transformer\.ff_out\.weight$", r"lm_head.weight"),
)
# transformers' SiglipVisionModel has no inner `vision_model`: its parameters sit at the top of `vision_tower`.
VISION_TOWER_KEY_MAPPING = ((r"^model\.vision_tower\.vision_tower\.vision_model\.(.+)$", r"vision_tower.\1"),)
# `mm_projector` is nn.Sequential(Linear, GELU, Linear): indices 0 and 2 hold the weights.
PROJECTOR_KEY_MAPPING = (
    (r"^model\.mm_projector\.0\.(weight|bias)$", r"multi_modal_projector.linear_1.\1"),
    (r"^model\.mm_projector\.2\.(weight|bias)$", r"multi_modal_projector.linear_2.\1"),
)
IMAGE_NEWLINE_KEY_MAPPING = ((r"^model\.image_newline$", r"image_newline"),)
KEY_MAPPINGS = {
    "language_model": LANGUAGE_MODEL_KEY_MAPPING,
    "vision_tower": VISION_TOWER_KEY_MAPPING,
    "projector": PROJECTOR_KEY_MAPPING,
    "image_newline": IMAGE_NEWLINE_KEY_MAPPING,
}
# Inside ShirgLavidaForDiffusionLM the language model's parameters live under this attribute.
LANGUAGE_MODEL_PREFIX = "language_model."
MULTIMODAL_COMPONENTS = ("vision_tower", "projector", "image_newline")

SUPPORTED_MODEL_TYPES = ("llada", "llava_llada")
# Tokenizer files copied unchanged from SRC (never its *.py remote code, which would clash with ours).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
COPY_BUFFER_BYTES = 8 * 2**20
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

_COMPILED_MAPPINGS = {
    component: tuple((re.compile(pattern), replacement) for pattern, replacement in table)
    for component, table in KEY_MAPPINGS.items()
}


def key_component(key: str) -> str | None:
    """Which component's table maps `key` (`language_model`, `vision_tower`, ...), or None."""
    for component, table in _COMPILED_MAPPINGS.items():
        if any(pattern.match(key) for pattern, _ in table):
            return component
    return None


def is_multimodal(keys) -> bool:
    """True when the checkpoint carries LaViDa's vision tower, projector or image newline."""
    return any(key_component(key) in MULTIMODAL_COMPONENTS for key in keys)


def rename_lavida_key(key: str, multimodal: bool = False) -> str | None:
    """Our parameter name for one original checkpoint key, or None when no mapping table covers it.

    `multimodal` targets `ShirgLavidaForDiffusionLM` (the language model under `language_model.`), otherwise a
    plain `LladaForMaskedDiffusion`.
    """
    component = key_component(key)
    if component is None:
        return None
    for pattern, replacement in _COMPILED_MAPPINGS[component]:
        if pattern.match(key):
            name = pattern.sub(replacement, key)
            return LANGUAGE_MODEL_PREFIX + name if multimodal and component == "language_model" else name
    return None


def model_class_for(config):
    """`ShirgLavidaForDiffusionLM` for a ShirgLavidaConfig, `LladaForMaskedDiffusion` for a LladaConfig."""
    from .modeling.modeling_llada import LladaForMaskedDiffusion
    from .modeling.modeling_shirg_lavida import ShirgLavidaForDiffusionLM

    return ShirgLavidaForDiffusionLM if config.model_type == ShirgLavidaConfig.model_type else LladaForMaskedDiffusion


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter name and shape of the model `config` builds (instantiated on the meta device: no memory)."""
    with torch.device("meta"):
        model = model_class_for(config)(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def plan_renaming(source_shapes: dict[str, tuple[int, ...]], config) -> dict[str, str]:
    """Map every source key to our name, checking the result is exactly the model's parameters.

    Raises `ValueError` listing unmapped keys, missing parameters and shape mismatches, so nothing is silently
    dropped or left uninitialised.
    """
    multimodal = config.model_type == ShirgLavidaConfig.model_type
    if is_multimodal(source_shapes) and not multimodal:
        raise ValueError("The checkpoint holds vision tower / projector / image newline weights: pass a "
                         "ShirgLavidaConfig to convert it as a full LaViDa model.")
    renamed = {key: rename_lavida_key(key, multimodal) for key in source_shapes}
    unmapped = sorted(key for key, name in renamed.items() if name is None)
    if unmapped:
        raise ValueError(f"{len(unmapped)} checkpoint keys have no mapping to shirg-hf names: {unmapped}")
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(renamed.values()))
    unexpected = sorted(key for key, name in renamed.items() if name not in expected)
    if missing or unexpected:
        raise ValueError(
            f"The checkpoint does not match its config: missing parameters {missing}, keys for parameters the "
            f"model does not have {unexpected}."
        )
    mismatched = [f"{key} {tuple(source_shapes[key])} (expected {expected[name]})"
                  for key, name in renamed.items() if tuple(source_shapes[key]) != expected[name]]
    if mismatched:
        raise ValueError(f"Tensor shapes disagree with config.json: {mismatched}")
    return renamed


def rename_lavida_state_dict(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Rename an in-memory original LLaDA / LaViDa state dict to our parameter names (checked, see plan_renaming)."""
    renamed = plan_renaming({key: tuple(tensor.shape) for key, tensor in state_dict.items()}, config)
    return {renamed[key]: tensor for key, tensor in state_dict.items()}


# ---- configs -------------------------------------------------------------------------------------------------
def _vision_prefix(name: str) -> str:
    return f"model.vision_tower.vision_tower.vision_model.{name}"


def lavida_vision_config(raw_config: dict, shapes: dict[str, tuple[int, ...]], num_attention_heads: int | None) -> dict:
    """SigLIP sizes read from the checkpoint's tensor shapes (LaViDa's config.json only names the tower).

    Heads cannot be read off shapes: taken from `num_attention_heads`, a `vision_config` entry of config.json,
    or so400m's 16 when the hidden size is so400m's 1152.
    """
    hidden, _, patch, _ = shapes[_vision_prefix("embeddings.patch_embedding.weight")]
    positions = shapes[_vision_prefix("embeddings.position_embedding.weight")][0]
    layer_ids = {int(m.group(1)) for key in shapes if (m := re.match(re.escape(_vision_prefix("encoder.layers.")) +
                                                                       r"(\d+)\.", key))}
    heads = num_attention_heads or raw_config.get("vision_config", {}).get("num_attention_heads")
    if heads is None and hidden == SO400M_TRUNCATED["hidden_size"]:
        heads = SO400M_TRUNCATED["num_attention_heads"]
    if heads is None:
        raise ValueError(f"The vision tower has hidden size {hidden} (not so400m's 1152): its number of attention "
                         "heads cannot be read from the weights; pass --vision-heads N.")
    side = math.isqrt(positions)
    return dict(
        SO400M_TRUNCATED,
        hidden_size=hidden,
        intermediate_size=shapes[_vision_prefix("encoder.layers.0.mlp.fc1.weight")][0],
        num_hidden_layers=len(layer_ids),
        num_attention_heads=heads,
        patch_size=patch,
        image_size=side * patch,
    )


def lavida_multimodal_config(raw_config: dict, shapes: dict, num_attention_heads: int | None = None,
                             vision_mode: str | None = None, image_token_id: int | None = None) -> ShirgLavidaConfig:
    """`ShirgLavidaConfig` of a full LaViDa checkpoint (its config.json plus the tensor shapes).

    The vision mode defaults to the one reproducing the checkpoint (`visual_tokens.lavida_checkpoint_mode`); the
    high-res side scales with the tower as LaViDa's geometry does (384 -> 672) and the
    SHIRG settings are the defaults (K = 768 of 2,304 for so400m; a third of the patches for smaller towers).
    """
    projector_type = raw_config.get("mm_projector_type", "mlp2x_gelu")
    if projector_type != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type {projector_type!r} is not supported; LaViDa uses 'mlp2x_gelu'.")
    vision = lavida_vision_config(raw_config, shapes, num_attention_heads)
    text = LladaConfig.from_lavida_config(raw_config)
    pinpoints = raw_config.get("image_grid_pinpoints")
    if isinstance(pinpoints, str):
        pinpoints = json.loads(pinpoints.replace("(", "[").replace(")", "]"))
    highres_image_size = vision["image_size"] * LAVIDA_GEOMETRY.highres_side // LAVIDA_GEOMETRY.native_side
    highres_side = highres_image_size // vision["patch_size"]
    cells = min(max(DEFAULT_SELECTION["coverage_cells"]), highres_side)
    budget = DEFAULT_SELECTION["budget"] if DEFAULT_SELECTION["budget"] <= highres_side**2 else \
        max(cells * cells, highres_side**2 // 3)  # towers smaller than so400m: keep a third of the patches
    kwargs = dict(
        vision_config=vision,
        text_config=text.to_dict(),
        vision_mode=vision_mode or lavida_checkpoint_mode(raw_config.get("image_aspect_ratio")),
        highres_image_size=highres_image_size,
        image_grid_pinpoints=pinpoints,
        anyres_pool_mode=raw_config.get("mm_spatial_pool_mode") or LAVIDA_GEOMETRY.pool_mode,
        selection={"budget": budget, "coverage_cells": [cells, cells]},
    )
    if image_token_id is not None:
        kwargs["image_token_id"] = image_token_id
    return ShirgLavidaConfig(**kwargs)


def read_source_config(src: Path) -> dict:
    """SRC/config.json (original LLaDA / LaViDa format), with its model_type checked."""
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: SRC must be an LLaDA/LaViDa checkpoint folder.")
    raw_config = json.loads(config_path.read_text())
    model_type = raw_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{config_path} has model_type {model_type!r}; convert-lavida reads original LLaDA/LaViDa configs "
            f"(model_type one of {SUPPORTED_MODEL_TYPES})."
        )
    return raw_config


# ---- streaming -----------------------------------------------------------------------------------------------
def list_weight_files(src: Path) -> list[Path]:
    """The safetensors shards of SRC (from the index when there is one)."""
    index_path = src / SAFE_WEIGHTS_INDEX_NAME
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index_path} has no `weight_map`.")
        files = [src / name for name in sorted(set(weight_map.values()))]
    elif (src / SAFE_WEIGHTS_NAME).is_file():
        files = [src / SAFE_WEIGHTS_NAME]
    else:
        raise FileNotFoundError(
            f"No {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {src}: only safetensors checkpoints are "
            "converted (convert *.bin files to safetensors first)."
        )
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"Shards listed in {index_path} are missing: {missing}")
    return files


def read_source_layout(weight_files: list[Path]) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Shapes and dtype names of every tensor, read from the shard headers only (no tensor data)."""
    shapes, owner, dtypes = {}, {}, set()
    for path in weight_files:
        with safe_open(str(path), framework="pt") as shard:
            for key in shard.keys():
                if key in owner:
                    raise ValueError(f"Key {key} appears in both {owner[key].name} and {path.name}.")
                tensor_slice = shard.get_slice(key)
                shapes[key] = tuple(tensor_slice.get_shape())
                dtypes.add(tensor_slice.get_dtype())
                owner[key] = path
    return shapes, dtypes


def copy_shard_renamed(source: Path, target: Path, renamed: dict[str, str]) -> dict[str, int]:
    """Write `source` to `target` with keys renamed: a new header, then the data section copied byte for byte.

    Returns {new name: byte size}. Memory use is one copy buffer (COPY_BUFFER_BYTES), not the shard.
    """
    with open(source, "rb") as reader:
        (header_size,) = struct.unpack("<Q", reader.read(8))
        header = json.loads(reader.read(header_size))
        header.pop("__metadata__", None)
        new_header = {renamed[key]: entry for key, entry in header.items()}
        new_header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(new_header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data section to 8 bytes
        with open(target, "wb") as writer:
            writer.write(struct.pack("<Q", len(encoded)))
            writer.write(encoded)
            shutil.copyfileobj(reader, writer, COPY_BUFFER_BYTES)
    return {renamed[key]: entry["data_offsets"][1] - entry["data_offsets"][0] for key, entry in header.items()}


def _output_shard_name(index: int, total: int) -> str:
    return SAFE_WEIGHTS_NAME if total == 1 else f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def write_weights(weight_files: list[Path], renamed: dict[str, str], out_dir: Path) -> None:
    """Stream each source shard into one output shard, plus the index when there are several."""
    from tqdm.auto import tqdm

    weight_map, total_size = {}, 0
    for shard_index, path in enumerate(tqdm(weight_files, desc="convert-lavida", unit="shard")):
        shard_name = _output_shard_name(shard_index, len(weight_files))
        sizes = copy_shard_renamed(path, out_dir / shard_name, renamed)
        weight_map.update(dict.fromkeys(sizes, shard_name))
        total_size += sum(sizes.values())
    if len(weight_files) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_config_and_code(config, out_dir: Path) -> None:
    """config.json with `auto_map`, the remote-code modules and generation_config.json, as save_pretrained would."""
    from transformers.dynamic_module_utils import custom_object_save

    from .modeling.generation_diffusion import DiffusionGenerationConfig

    model_class = model_class_for(config)
    with torch.device("meta"):
        meta_model = model_class(config)  # no memory: only used to locate and export the code
    config.architectures = [model_class.__name__]
    if meta_model._auto_class is not None:
        custom_object_save(meta_model, out_dir, config=config)
        if hasattr(meta_model, "add_task_auto_map"):  # the image-text-to-text pipeline's Auto class too
            meta_model.add_task_auto_map()
    config.save_pretrained(out_dir)
    DiffusionGenerationConfig.from_model_config(config).save_pretrained(out_dir)


def _load_tokenizer(src: Path):
    if not (src / "tokenizer.json").is_file():
        return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(src)


def _image_token_id(tokenizer, image_token_id: int | None) -> int | None:
    """The `<image>` id: given, or the tokenizer's (added after its vocabulary when it has none)."""
    if image_token_id is not None or tokenizer is None:
        return image_token_id
    known = tokenizer.convert_tokens_to_ids("<image>")
    return known if known is not None and known != tokenizer.unk_token_id else len(tokenizer)


def convert_lavida_checkpoint(src, dst, overwrite: bool = False, vision_mode: str | None = None,
                              vision_heads: int | None = None, image_token_id: int | None = None) -> Path:
    """Convert an original LLaDA / LaViDa checkpoint folder SRC into a shirg-hf folder DST.

    DST then loads with `AutoModel.from_pretrained(DST)` after `import shirg_hf` (and with
    `trust_remote_code=True` without it). Full LaViDa checkpoints also get the processor (when SRC has a
    tokenizer). Tensors keep their dtype (bf16 stays bf16; `config.dtype` records it). DST is written into a
    temporary folder next to it and moved into place at the end, so an interrupted conversion never leaves a
    half-written DST. Returns DST.
    """
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not src.is_dir():
        raise FileNotFoundError(f"SRC {src} is not a folder.")
    if src == dst:
        raise ValueError("SRC and DST are the same folder; choose a new DST.")
    check_destination(dst, overwrite)

    raw_config = read_source_config(src)
    weight_files = list_weight_files(src)
    shapes, dtypes = read_source_layout(weight_files)
    tokenizer = _load_tokenizer(src)
    if is_multimodal(shapes):
        config = lavida_multimodal_config(raw_config, shapes, vision_heads, vision_mode,
                                          _image_token_id(tokenizer, image_token_id))
    else:
        if vision_mode or vision_heads or image_token_id is not None:
            raise ValueError("--vision-mode / --vision-heads / --image-token-id apply to full LaViDa checkpoints; "
                             "SRC holds a language model only.")
        config = LladaConfig.from_lavida_config(raw_config)
    renamed = plan_renaming(shapes, config)
    if len(dtypes) == 1:
        config.dtype = SAFETENSORS_DTYPES.get(dtypes.pop())

    with atomic_folder(dst, overwrite=overwrite) as staging:
        write_weights(weight_files, renamed, staging)
        write_config_and_code(config, staging)
        if tokenizer is not None and config.model_type == ShirgLavidaConfig.model_type:
            from .processing.processing_shirg_lavida import ShirgLavidaProcessor

            ShirgLavidaProcessor.from_model_config(config, tokenizer).save_pretrained(staging)
            (staging / MODEL_CARD_NAME).write_text(build_model_card(config), encoding="utf-8")
        else:
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, staging / name)
    return dst


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert-lavida",
        help="convert an original LLaDA / LaViDa checkpoint folder into a shirg-hf folder",
        description=convert_lavida_checkpoint.__doc__.splitlines()[0],
    )
    parser.add_argument("src", metavar="SRC", help="folder with the original config.json and *.safetensors")
    parser.add_argument("dst", metavar="DST", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it already exists")
    parser.add_argument("--vision-mode", choices=vision_mode_names(),
                        help="vision mode of the converted model (default: the one reproducing the checkpoint, "
                             f"{lavida_checkpoint_mode('anyres')} for anyres)")
    parser.add_argument("--vision-heads", type=int, help="SigLIP attention heads (needed only for non-so400m towers)")
    parser.add_argument("--image-token-id", type=int,
                        help="id of the <image> token (default: the tokenizer's, added after its vocabulary)")
    parser.set_defaults(func=run)


def run(args) -> int:
    dst = convert_lavida_checkpoint(args.src, args.dst, overwrite=args.overwrite, vision_mode=args.vision_mode,
                                    vision_heads=args.vision_heads, image_token_id=args.image_token_id)
    print(f"converted {args.src} -> {dst}")
    return 0


__all__ = [
    "KEY_MAPPINGS",
    "convert_lavida_checkpoint",
    "expected_shapes",
    "lavida_multimodal_config",
    "plan_renaming",
    "rename_lavida_key",
    "rename_lavida_state_dict",
]
