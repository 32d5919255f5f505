"""`shirg-hf demo`: the whole SHIRG-LaViDa pipeline on a tiny, randomly initialised model built locally.

Image -> 672-style high-res SigLIP patches -> SHIRG selection (heat-map saved) -> projector -> LLaDA prefix cache
-> masked-diffusion answer. No downloads; the weights are random, so the answer is noise by design.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .devices import add_device_arguments, resolve_device, resolve_dtype
from .export import save_model_folder
from .fileio import atomic_folder
from .modeling.configuration_shirg_lavida import ShirgLavidaConfig
from .modeling.visual_tokens import LAVIDA_GEOMETRY
from .modeling.modeling_shirg_lavida import ShirgLavidaForDiffusionLM
from .processing.processing_shirg_lavida import ShirgLavidaProcessor, build_prompt
from .tokenization import build_tiny_tokenizer
from .processing.image_processing_shirg import load_image
from .visualize import render_selection, save_png_atomically

DEFAULT_QUESTION = "What is the total on the invoice?"


def demo_config(budget: int = 128) -> ShirgLavidaConfig:
    """The tiny test model with a 24x24 high-res grid (576 patches) so the selection is visible."""
    return ShirgLavidaConfig.tiny(highres_image_size=96, selection={"budget": budget, "coverage_cells": [8, 8]})


def make_demo_image(size: int = LAVIDA_GEOMETRY.highres_side) -> Image.Image:
    """A synthetic document: a title, lines of text, a small table and a bar chart on a white page."""
    page = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    title, body = ImageFont.load_default(size=size // 16), ImageFont.load_default(size=size // 32)
    draw.text((size // 12, size // 14), "INVOICE  #2048", fill=(10, 10, 10), font=title)
    lines = ["Item            Qty     Price", "Widget A          3     12.50", "Widget B          1     99.00",
             "Service fee       1     15.00", "TOTAL                  151.50"]
    for row, line in enumerate(lines):
        draw.text((size // 12, size // 4 + row * size // 18), line, fill=(20, 20, 20), font=body)
    for bar, height in enumerate((0.12, 0.22, 0.17, 0.3)):
        left = size // 2 + bar * size // 10
        draw.rectangle([left, int(size * (0.95 - height)), left + size // 14, int(size * 0.95)],
                       fill=(40 + 50 * bar, 90, 200 - 40 * bar))
    return page


def kv_cache_bytes(config, prefix_length: int, dtype: torch.dtype) -> int:
    """Bytes of the prefix cache: keys and values of every layer for `prefix_length` tokens (batch 1)."""
    text = config.text_config
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim
    return per_token * prefix_length * torch.finfo(dtype).bits // 8


def run_demo(image: Image.Image, question: str, budget: int, max_new_tokens: int, out_dir: Path | None,
             overwrite: bool, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Build the tiny model, answer `question` about `image`, save the heat-map (and the model with `out_dir`)."""
    config = demo_config(budget)
    torch.manual_seed(seed)
    model = ShirgLavidaForDiffusionLM(config).to(device, dtype).eval()
    processor = ShirgLavidaProcessor.from_model_config(config, build_tiny_tokenizer())
    inputs = processor(images=[image], text=[build_prompt(question)], return_tensors="pt").to(device)

    started = time.perf_counter()
    with torch.inference_mode():
        features = model.vision_features(inputs["pixel_values"])  # [1, N, Dv]
        vision_seconds = time.perf_counter() - started
        started = time.perf_counter()
        selection = model.selector(features, grid_size=config.highres_grid)
        selection_seconds = time.perf_counter() - started
        started = time.perf_counter()
        answer_ids = model.generate(**inputs, max_new_tokens=max_new_tokens, block_length=max_new_tokens)
        generate_seconds = time.perf_counter() - started

    rows, cols = config.highres_grid
    picture = render_selection(
        image, selection.scores[0].float().cpu(), selection.kept_indices[0].cpu(), config.highres_grid,
        title=f"SHIRG: kept K={budget} of {rows * cols} patches + 1 summary token",
        note="RANDOM WEIGHTS: tiny untrained model - shows the mechanics, not a trained selection",
        coverage_cells=tuple(config.selection["coverage_cells"]),
    )
    if out_dir is not None:
        with atomic_folder(out_dir, overwrite=overwrite) as staging:
            save_model_folder(model, processor, staging)
            picture.save(staging / "heatmap.png")
        heatmap = out_dir / "heatmap.png"
    else:
        heatmap = save_png_atomically(picture, Path(tempfile.mkdtemp(prefix="shirg-demo-")) / "heatmap.png", False)
    prefix_length = inputs["input_ids"].shape[1]
    return {
        "config": config,
        "answer": processor.decode(answer_ids[0]),
        "answer_ids": answer_ids[0].tolist(),
        "prefix_length": prefix_length,
        "visual_tokens": int((inputs["input_ids"] == config.image_token_id).sum()),
        "kv_cache_bytes": kv_cache_bytes(config, prefix_length, model.dtype),
        "vision_seconds": vision_seconds,
        "selection_seconds": selection_seconds,
        "generate_seconds": generate_seconds,
        "heatmap": heatmap,
    }


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on a tiny random model (no downloads)",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--image", help="your own image file (default: a generated document page)")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help="the question to ask about the image")
    parser.add_argument("--budget", type=int, default=128, help="SHIRG budget K (of 576 patches; default 128)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer length L (default 16)")
    parser.add_argument("--out", help="also save the model + processor + heat-map here as a save_pretrained folder")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: the tiny model's kernels gain nothing from more, "
                             "and threads competing with other processes for cores run 10-100x slower)")
    add_device_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.question.strip():
        raise ValueError("--question must not be empty")
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    args.device = resolve_device(args.device)
    image = load_image(args.image) if args.image else make_demo_image()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = run_demo(image, args.question, args.budget, args.max_new_tokens,
                          Path(args.out) if args.out else None, args.overwrite, device=args.device,
                          dtype=resolve_dtype(args.dtype, in_memory=True))
    finally:
        torch.set_num_threads(previous_threads)
    config = result["config"]
    print("shirg-hf demo: a TINY model with RANDOM weights, built locally - the answer is noise by design.")
    print(f"  config: vision_mode={config.vision_mode}, high-res {config.highres_image_size} px -> "
          f"{config.num_highres_patches} patches, selection {config.selection}")
    print(f"  question: {args.question}")
    print(f"  visual tokens in the prompt: {result['visual_tokens']} (K + 1 summary); prefix length "
          f"{result['prefix_length']} tokens; prefix KV cache {result['kv_cache_bytes'] / 1024:.1f} KiB")
    print(f"  timings ({args.threads} CPU thread{'s' if args.threads > 1 else ''}): vision tower "
          f"{result['vision_seconds'] * 1e3:.1f} ms, selection "
          f"{result['selection_seconds'] * 1e3:.1f} ms, generate {result['generate_seconds'] * 1e3:.1f} ms")
    print(f"  answer ids: {result['answer_ids']}")
    print(f"  answer: {result['answer']!r}")
    print(f"  selection heat-map: {result['heatmap']}")
    if args.out:
        print(f"  saved model + processor (save_pretrained folder): {Path(args.out).resolve()}")
    return 0
