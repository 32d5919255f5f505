"""`shirg-hf demo`: the shipped evidence model (trained from scratch, see docs/EVIDENCE-RESULTS.md) reads a detail
of a fresh test-style image that its native view cannot; `--random-tiny` runs the whole SHIRG-LaViDa pipeline on a
tiny, randomly initialised model instead (the mechanics; the answer is noise by design). No downloads.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .devices import add_device_arguments, resolve_device, resolve_dtype
from .export import save_model_folder
from .fileio import atomic_folder, check_destination
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
        help="the shipped trained model reads a detail at high resolution (--random-tiny: the mechanics on a "
             "random model); no downloads",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--random-tiny", action="store_true",
                        help="run a tiny RANDOM model instead of the trained one (the pipeline's mechanics)")
    parser.add_argument("--seed", type=int,
                        help="which fresh test-style image the trained model gets (default: the first seed from 0 on "
                             "which SHIRG reads the detail and the native view does not, a selected example, said "
                             "so in the output; 0 with --question)")
    parser.add_argument("--image", help="your own image file (default: a generated image)")
    parser.add_argument("--question", help="the question to ask about the image (default: the generated image's "
                                           "detail question; with --random-tiny: " + repr(DEFAULT_QUESTION) + ")")
    parser.add_argument("--budget", type=int,
                        help="SHIRG budget K (default: 84 of 256 patches for the trained model, 128 of 576 with "
                             "--random-tiny)")
    parser.add_argument("--max-new-tokens", type=int, default=16,
                        help="answer length L for --random-tiny (default 16; the trained model uses its own 4)")
    parser.add_argument("--out", help="also save the model + processor + heat-map here as a save_pretrained folder")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: the tiny model's kernels gain nothing from more, "
                             "and threads competing with other processes for cores run 10-100x slower)")
    add_device_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.question is not None and not args.question.strip():
        raise ValueError("--question must not be empty")
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.seed is not None and (args.random_tiny or args.image is not None):
        raise ValueError("--seed picks the generated test-style image for the trained model; it has no effect with "
                         f"{'--random-tiny' if args.random_tiny else '--image'}: drop one of the two")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be 0 or more, got {args.seed}")
    if args.out:
        check_destination(Path(args.out).resolve(), args.overwrite)  # before minutes of work, not after
    args.device = resolve_device(args.device)
    if not args.random_tiny:
        return run_trained(args)
    question = args.question or DEFAULT_QUESTION
    image = load_image(args.image) if args.image else make_demo_image()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = run_demo(image, question, 128 if args.budget is None else args.budget, args.max_new_tokens,
                          Path(args.out) if args.out else None, args.overwrite, device=args.device,
                          dtype=resolve_dtype(args.dtype, in_memory=True))
    finally:
        torch.set_num_threads(previous_threads)
    config = result["config"]
    print("shirg-hf demo: a TINY model with RANDOM weights, built locally - the answer is noise by design.")
    print(f"  config: vision_mode={config.vision_mode}, high-res {config.highres_image_size} px -> "
          f"{config.num_highres_patches} patches, selection {config.selection}")
    print(f"  question: {question}")
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


def image_caption(image_path: str | None, seed: int | None, selected: bool, budget: int) -> tuple[str, str]:
    """Where the demo's image came from and whether it was selected: a caption (console and picture) and what the
    console adds to it."""
    if image_path is not None:
        return f"your {image_path}", ""
    if not selected:
        return f"test-style image, seed {seed}", ""
    skipped = {0: "", 1: "seed 0 does not show it; "}.get(seed, f"seeds 0-{seed - 1} do not show it; ")
    return (f"test-style image, seed {seed}, SELECTED: the first seed where SHIRG K={budget} is right and the native "
            f"view wrong", f" ({skipped}--seed N shows any image unselected)")


def run_trained(args: argparse.Namespace) -> int:
    """The shipped evidence model on a fresh test-style image (or --image/--question): three views side by side."""
    from . import evidence_demo
    from .evidence import RESULTS_NAME

    if args.image is not None and args.question is None:
        raise ValueError("--image needs --question (the trained model answers questions like the synth set's, e.g. "
                         "'What is in the red tag?')")
    model_dir = evidence_demo.evidence_model_path()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        model, processor = evidence_demo.load_trained(model_dir, args.device, resolve_dtype(args.dtype))
        budget = model.config.selection["budget"] if args.budget is None else args.budget
        processor.check_budget(budget)
        selected = args.image is None and args.seed is None and args.question is None
        if args.image is not None:
            seed, image, question, answers = None, load_image(args.image), args.question, None
        else:
            seed = evidence_demo.showcase_seed(model, processor, budget) if selected else (args.seed or 0)
            image, question, answers = evidence_demo.demo_sample(seed)
            if args.question is not None:
                question, answers = args.question, None
        results = evidence_demo.answer_views(model, processor, image, question, budget)
        kept = evidence_demo.kept_patches(model, processor, image, budget)
    finally:
        torch.set_num_threads(previous_threads)
    caption, details = image_caption(args.image, seed, selected, budget)
    picture = evidence_demo.demo_picture(image, model.config.vision_config.image_size, model.config.highres_grid,
                                         kept, caption, question, answers, results)
    if args.out:
        out = Path(args.out)
        with atomic_folder(out, overwrite=args.overwrite) as staging:
            model.save_pretrained(staging)
            processor.save_pretrained(staging)
            picture.save(staging / "demo.png")
        picture_path = out / "demo.png"
    else:
        picture_path = save_png_atomically(picture, Path(tempfile.mkdtemp(prefix="shirg-demo-")) / "demo.png", False)
    config = model.config
    print(f"shirg-hf demo: the shipped evidence model ({model_dir}), trained from scratch on `shirg-hf synth` data")
    print(f"  image: {caption}{details}; drawn at {config.highres_image_size} px, native view "
          f"{config.vision_config.image_size} px")
    print(f"  question: {question}" + ("" if answers is None else f"   truth: {' / '.join(answers)}"))
    threads = f"{args.threads} CPU thread{'s' if args.threads > 1 else ''}"
    for result in results:
        verdict = evidence_demo.verdict(result["answer"], answers)
        print(f"  {result['view']:>22}: {result['answer']!r:8} {result['visual_tokens']:4d} visual tokens, prefix "
              f"{result['prefix_tokens']} tokens, KV cache {result['kv_cache_bytes'] / 1024:.0f} KiB, "
              f"{result['seconds'] * 1e3:.1f} ms per answer ({threads}, after a warm-up)"
              + (f"  {verdict}" if verdict else ""))
    measured = model_dir / RESULTS_NAME
    if measured.is_file():
        results = json.loads(measured.read_text(encoding="utf-8"))
        shown = ", ".join(f"{name} {100 * value:.1f} %" for name, value in results["detail_accuracy"].items())
        print(f"  this model on {results['test_questions']} test questions (detail accuracy): {shown}; "
              f"{results['note']}")
    print(f"  picture (both sides, kept tokens, answers): {picture_path}")
    if args.out:
        print(f"  saved model + processor (save_pretrained folder): {Path(args.out).resolve()}")
    return 0
