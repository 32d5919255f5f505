"""Selection heat-maps: which patches SHIRG keeps and how it scores them, plus the `shirg-hf select` command.

The picture has two panels side by side: the image as the tower sees it with dropped patches dimmed (kept
patches stay bright, coverage cells outlined), and the per-patch score as a heat-map (dark blue = low,
yellow = high). With `--model` the command uses that model's tower and selection settings; without it, it
encodes the image with a randomly initialised tiny SigLIP tower and says so on the picture: the scores then show
the mechanics of the selector (text, edges and distinctive regions against bland background), not what a trained
tower sees.
"""

import argparse
import contextlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .devices import add_device_arguments, resolve_device, resolve_dtype
from .fileio import atomic_file
from .modeling.selection_shirg import ShirgSelector, capture_received_attention
from .modeling.visual_tokens import (
    DEFAULT_SELECTION,
    IMPORTANCE_SOURCES,
    LAVIDA_GEOMETRY,
    get_selection_method,
    needs_tower_attention,
    selection_method_names,
)
from .processing.image_processing_shirg import ShirgImageProcessor, load_image
from .validation import check_model_source

# Viridis sampled at 0, 0.25, 0.5, 0.75, 1 (linear interpolation in between).
HEAT_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32)
PATCH_SIZE = LAVIDA_GEOMETRY.patch_size  # of the random tiny tower
RANDOM_TOWER_BUDGET = 192  # K of the random tower's default 24 x 24 grid
CELL_PIXELS = 16  # rendered size of one patch
DIM_FACTOR = 0.25  # brightness kept by dropped patches
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)
WARNING_COLOR = (190, 0, 0)
# Largest --grid of the random tower: its attention over GRID**2 patches grows as GRID**4 (64: 4,096 patches).
MAX_GRID = 64


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to uint8 RGB colours [..., 3] (viridis-like)."""
    position = np.clip(values, 0.0, 1.0) * (len(HEAT_ANCHORS) - 1)
    low = np.minimum(np.floor(position).astype(int), len(HEAT_ANCHORS) - 2)
    fraction = (position - low)[..., None]
    colors = HEAT_ANCHORS[low] * (1 - fraction) + HEAT_ANCHORS[low + 1] * fraction
    return np.round(colors).astype(np.uint8)


def pixel_values_for(image: Image.Image, side: int) -> torch.Tensor:
    """The model's preprocessing (SigLIP: bicubic squash to side x side, 1/255, mean = std = 0.5) -> [1, 3, S, S]."""
    processor = ShirgImageProcessor(size={"height": side, "width": side})
    return processor(image, return_tensors="pt").pixel_values


def random_tiny_tower(image_size: int, seed: int):
    """A randomly initialised tiny SigLIP vision tower (hidden 64, 2 layers, patch 14), built reproducibly."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=PATCH_SIZE, vision_use_head=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SiglipVisionModel(config).eval()


def tower_features(tower, pixel_values: torch.Tensor) -> torch.Tensor:
    """Raw output of the tower's last layer (before post_layernorm), as the model feeds the selector: [1, N, D]."""
    with torch.inference_mode():
        return tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]


def render_selection(
    image: Image.Image,
    scores: torch.Tensor,
    kept_indices: torch.Tensor,
    grid_size: tuple[int, int],
    title: str,
    note: str | None = None,
    coverage_cells: tuple[int, int] | None = None,
    caption: str | None = None,
) -> Image.Image:
    """Two panels: kept patches over the image (dropped ones dimmed) and the score heat-map.

    scores: [N] per-patch scores (min-max scaled for display); kept_indices: [K] flat patch indices;
    caption: text under the left panel (default "kept K of N patches (dropped dimmed)").
    """
    rows, cols = grid_size
    width, height = cols * CELL_PIXELS, rows * CELL_PIXELS
    kept = np.zeros(rows * cols, dtype=bool)
    kept[kept_indices.cpu().numpy()] = True
    kept_grid = kept.reshape(rows, cols).repeat(CELL_PIXELS, 0).repeat(CELL_PIXELS, 1)  # [H px, W px]

    view = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    view = np.where(kept_grid[..., None], view, view * DIM_FACTOR).astype(np.uint8)
    overlay = Image.fromarray(view)

    values = scores.detach().to(torch.float32).cpu().numpy()
    span = values.max() - values.min()
    values = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    heat = heat_colors(values.reshape(rows, cols)).repeat(CELL_PIXELS, 0).repeat(CELL_PIXELS, 1)
    heat_map = Image.fromarray(heat)

    if coverage_cells is not None:
        for panel in (overlay, heat_map):
            _draw_cell_borders(ImageDraw.Draw(panel), grid_size, coverage_cells)

    font = ImageFont.load_default(size=14)
    margin, line = 12, 20
    header_lines = [(title, TEXT_COLOR)] + ([(note, WARNING_COLOR)] if note else [])
    header = margin + line * len(header_lines)
    canvas = Image.new("RGB", (2 * width + 3 * margin, header + height + line + margin), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for number, (text, color) in enumerate(header_lines):
        draw.text((margin, margin // 2 + number * line), text, fill=color, font=font)
    canvas.paste(overlay, (margin, header))
    canvas.paste(heat_map, (2 * margin + width, header))
    caption_y = header + height + 4
    caption = caption or f"kept {int(kept.sum())} of {rows * cols} patches (dropped dimmed)"
    draw.text((margin, caption_y), caption, fill=TEXT_COLOR, font=font)
    draw.text((2 * margin + width, caption_y), "score: dark blue = low, yellow = high", fill=TEXT_COLOR, font=font)
    return canvas


def _draw_cell_borders(draw: ImageDraw.ImageDraw, grid_size: tuple[int, int], cells: tuple[int, int]) -> None:
    """Outline the coverage cells: cell row i starts at patch row ceil(i * H / rows), as the selector splits."""
    rows, cols = grid_size
    cell_rows, cell_cols = cells
    width, height = cols * CELL_PIXELS, rows * CELL_PIXELS
    for i in range(1, cell_rows):
        y = (i * rows + cell_rows - 1) // cell_rows * CELL_PIXELS
        draw.line([(0, y), (width, y)], fill=(255, 255, 255), width=1)
    for j in range(1, cell_cols):
        x = (j * cols + cell_cols - 1) // cell_cols * CELL_PIXELS
        draw.line([(x, 0), (x, height)], fill=(255, 255, 255), width=1)


def save_png_atomically(picture: Image.Image, out: str | Path, overwrite: bool) -> Path:
    """Write `picture` as PNG atomically (`fileio.atomic_file`); refuse to replace `out` unless `overwrite`."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name such as heat.png")
    with atomic_file(out, overwrite=overwrite) as stream:
        picture.save(stream, format="PNG")
    return out


# ---- command line ------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "select",
        help="draw which patches SHIRG keeps for an image, with the score heat-map, as a PNG",
        description=(
            "Encode IMAGE with the vision tower of --model (a saved shirg_lavida folder) or, without it, a "
            "randomly initialised tiny SigLIP tower (the picture then says so), run the selector and write the "
            "kept patches beside the score heat-map as a PNG."
        ),
    )
    parser.add_argument("image", metavar="IMAGE", help="image file (any format PIL reads)")
    parser.add_argument("--model", help="save_pretrained folder (or Hub repo id) whose tower and selection to use")
    parser.add_argument("--budget", type=int,
                        help="K, patches to keep (default: the model's; without --model 192 of 24x24 = 576)")
    parser.add_argument("--method", choices=selection_method_names(),
                        help="a registered selection method (default: the model's, else "
                             f"{DEFAULT_SELECTION['method']})")
    parser.add_argument("--grid", type=int, default=24,
                        help="without --model: patches per side; the image is resized to GRID*14 pixels (default 24)")
    parser.add_argument("--coverage", type=int, nargs=2, metavar=("ROWS", "COLS"),
                        help="coverage cells (default: the model's, else 8 8)")
    parser.add_argument("--importance", choices=IMPORTANCE_SOURCES,
                        help="importance source: the feature-similarity proxy, or a tower layer's received attention "
                             "(FastV-style, or normalised by look-alikes); default: the model's, else similarity")
    parser.add_argument("--attention-layer", type=int, metavar="L",
                        help="tower layer whose attention --importance reads (negative counts from the last; "
                             "default: the model's, else the middle layer)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tower and of the random baseline")
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_device_arguments(parser)
    parser.set_defaults(func=run)


def _features_from_model(model_path: str, image: Image.Image, dtype="auto", device="cpu", overrides=None,
                         method=None):
    """Raw high-res tower features [1, N, D], the received attention [1, N] of the settings' tower layer when they
    read it (else None), grid size and selection settings (the model's, updated with `overrides`)."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(model_path, dtype=dtype).to(device).eval()
    if model.config.model_type != "shirg_lavida":
        raise ValueError(f"{model_path} holds a {model.config.model_type!r} model; --model needs a shirg_lavida "
                         "folder (from `shirg-hf demo --out`, `convert-lavida` or `export`).")
    image_processor = AutoProcessor.from_pretrained(model_path).image_processor
    side = model.config.highres_image_size
    pixel_values = image_processor(image, size={"height": side, "width": side}, return_tensors="pt")["pixel_values"]
    selection = {**DEFAULT_SELECTION, **model.config.selection, **(overrides or {})}
    layer = selection["attention_layer"] if needs_tower_attention(selection, method) else False
    with torch.inference_mode(), _attention_capture(model.vision_tower.encoder, layer) as seen:
        features = model.vision_features(pixel_values.to(device, model.dtype))  # [1, N, D]
    return features, seen.get("attention"), model.config.highres_grid, selection


def _attention_capture(encoder, layer):
    """`capture_received_attention(encoder, layer)`, or a context yielding an empty dict when `layer` is False."""
    return contextlib.nullcontext({}) if layer is False else capture_received_attention(encoder, layer)


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.grid <= MAX_GRID:
        raise ValueError(f"--grid must be between 1 and {MAX_GRID} patches per side, got {args.grid} (the random "
                         f"tower's attention over {args.grid}x{args.grid} patches grows as GRID**4); use --grid <= "
                         f"{MAX_GRID}, or --model for a real model's grid")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if args.model:
        check_model_source(args.model)
    device = resolve_device(args.device)
    image = load_image(args.image)
    overrides = {name: value for name, value in (("importance", args.importance),
                                                 ("attention_layer", args.attention_layer)) if value is not None}
    if args.model:
        features, attention, grid_size, selection_config = _features_from_model(
            args.model, image, resolve_dtype(args.dtype), device, overrides, args.method)
        note = f"model: {args.model}"
    else:
        grid_size = (args.grid, args.grid)
        selection_config = {**DEFAULT_SELECTION, "budget": RANDOM_TOWER_BUDGET, **overrides}
        dtype = resolve_dtype(args.dtype, in_memory=True)
        tower = random_tiny_tower(args.grid * PATCH_SIZE, args.seed).to(device, dtype)
        reads = needs_tower_attention(selection_config, args.method)
        with _attention_capture(tower.encoder, selection_config["attention_layer"] if reads else False) as seen:
            features = tower_features(tower, pixel_values_for(image, args.grid * PATCH_SIZE).to(device, dtype))
        attention = seen.get("attention")
        note = "RANDOM WEIGHTS: randomly initialised tiny SigLIP (untrained) - shows the mechanics, not a trained model"
    features = features.float().cpu()  # selection and the picture in float32 on the CPU
    attention = None if attention is None else attention.cpu()
    method = args.method or selection_config["method"]
    budget = args.budget if args.budget is not None else selection_config["budget"]
    coverage = tuple(args.coverage or selection_config["coverage_cells"])
    selector = ShirgSelector(**{**selection_config, "method": method, "budget": budget, "coverage_cells": coverage,
                                "seed": args.seed, "adaptive_budget": None})
    num_patches = grid_size[0] * grid_size[1]
    if not args.model and budget > num_patches:
        raise ValueError(f"--budget {budget} exceeds the random tower's {num_patches} patches (--grid {args.grid}); "
                         f"pass --grid {LAVIDA_GEOMETRY.highres_grid[0]} for LaViDa's "
                         f"{LAVIDA_GEOMETRY.num_highres_patches:,} high-res patches, or --model DIR")
    selector.check_budget(budget, num_patches)
    selection = selector(features, grid_size=grid_size, attentions=attention)
    summary = " + 1 summary token" if selection.has_summary else ""
    title = (f"SHIRG selection  method={method}  K={selection.kept_indices.shape[1]} of "
             f"{num_patches} patches{summary}")
    spec = get_selection_method(method)
    cells = coverage if spec.uses_coverage else None
    caption = f"{budget} {method} regions (centres shown)" if spec.builder is not None else None
    picture = render_selection(image, selection.scores[0], selection.kept_indices[0], grid_size, title, note, cells,
                               caption)
    written = save_png_atomically(picture, out, args.overwrite)
    print(f"wrote {written} ({picture.width}x{picture.height}); kept {selection.kept_indices.shape[1]} of "
          f"{num_patches} patches with method={method}")
    return 0


__all__ = ["heat_colors", "render_selection", "save_png_atomically", "register", "run"]
