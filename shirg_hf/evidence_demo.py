"""`shirg-hf demo` on the shipped evidence model: one test-style image, the native view, all high-res tokens and
SHIRG at K side by side, with the picture of what each view sees."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .processing.processing_shirg_lavida import build_prompt

DEMO_SEED_OFFSET = 1000  # demo images come from test-split seeds 1000 + --seed, never from a reported table
SHOWCASE_SEEDS = 100  # how many seeds the default demo tries before it gives up
PANEL = 256


def evidence_model_path(part: str = "model") -> Path:
    """Path of the shipped evidence model: `model` (merged LoRA, a save_pretrained folder), `stage1` (the base
    before the projector LoRA) or `adapter` (the unmerged LoRA)."""
    root = Path(__file__).resolve().parent / "evidence_model"
    path = {"model": root, "stage1": root / "stage1", "adapter": root / "adapter"}.get(part)
    if path is None:
        raise ValueError(f"part must be 'model', 'stage1' or 'adapter', got {part!r}")
    if not (path / ("adapter_config.json" if part == "adapter" else "config.json")).is_file():
        raise FileNotFoundError(f"the evidence model's {part} folder is missing from this installation: {path}")
    return path


def demo_sample(seed: int):
    """A detail question of test-split seed DEMO_SEED_OFFSET + `seed`, drawn like one of the test set's: rows at
    random indices until one asks a detail question, so each family comes up as often as among the test set's detail
    questions (a seed's first detail row would favour the family of row 0). Returns (image, question, answers)."""
    from .synth import generate_sample

    pick = np.random.default_rng(seed)
    for _ in range(64):
        sample = generate_sample("test", DEMO_SEED_OFFSET + seed, int(pick.integers(2**31)))
        if sample.row["question_type"] == "detail":
            return sample.image, sample.row["question"], sample.row["answers"]
    raise RuntimeError("no detail question in 64 rows")  # unreachable: about 70 % of the rows ask one


def verdict(answer: str, answers: list[str] | None) -> str:
    """'correct' or 'wrong' by `compare`'s exact match; '' when the truth is unknown (a user's own question)."""
    from .compare import exact_match

    return "" if answers is None else ("correct" if exact_match(answer, answers) else "wrong")


def view_inputs(model, processor, image: Image.Image, question: str, mode: str, budget: int):
    """The processor's batch of one for `question` about `image` under vision `mode` (SHIRG at `budget`)."""
    from .evidence import SELECTING

    kwargs = {"shirg_budget": budget} if mode == SELECTING else {}
    return processor(images=[image], text=[build_prompt(question)], vision_mode=mode, return_tensors="pt",
                     **kwargs).to(model.device)


@torch.inference_mode()
def answer(model, processor, image: Image.Image, question: str, mode: str, budget: int) -> str:
    """One greedy answer of `question` about `image` under vision `mode`."""
    inputs = view_inputs(model, processor, image, question, mode, budget)
    return processor.decode(model.generate(**inputs)[0]).strip()


def showcase_seed(model, processor, budget: int) -> int:
    """The first seed (from 0) whose detail question SHIRG at `budget` answers right and the native view wrong."""
    from .evidence import NATIVE_VIEW, SELECTING

    for seed in range(SHOWCASE_SEEDS):
        image, question, answers = demo_sample(seed)
        if (verdict(answer(model, processor, image, question, SELECTING, budget), answers) == "correct"
                and verdict(answer(model, processor, image, question, NATIVE_VIEW, budget), answers) == "wrong"):
            return seed
    raise ValueError(f"on none of seeds 0-{SHOWCASE_SEEDS - 1} does SHIRG K={budget} read the detail that the native "
                     f"view misses; pass --seed N to see any one of them, or another --budget")


def load_trained(model_dir: Path, device="cpu", dtype="auto"):
    from .modeling.modeling_shirg_lavida import ShirgLavidaForDiffusionLM
    from .processing.processing_shirg_lavida import ShirgLavidaProcessor

    model = ShirgLavidaForDiffusionLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model, ShirgLavidaProcessor.from_pretrained(model_dir)


@torch.inference_mode()
def answer_views(model, processor, image: Image.Image, question: str, budget: int, repeats: int = 3) -> list[dict]:
    """Answer under the native view, all high-res tokens and SHIRG at `budget`; seconds per answer are the median
    of `repeats` runs after one warm-up run."""
    from .demo import kv_cache_bytes
    from .evidence import ALL_TOKENS, NATIVE_VIEW, SELECTING

    results = []
    views = (("native view", NATIVE_VIEW), ("all high-res tokens", ALL_TOKENS), (f"SHIRG K={budget}", SELECTING))
    for name, mode in views:
        inputs = view_inputs(model, processor, image, question, mode, budget)
        answer_ids = model.generate(**inputs)  # the warm-up run, whose answer is the one shown
        seconds = []
        for _ in range(repeats):
            began = time.perf_counter()
            model.generate(**inputs)
            seconds.append(time.perf_counter() - began)
        prefix = int(inputs["attention_mask"].sum())
        results.append({
            "view": name, "mode": mode, "answer": processor.decode(answer_ids[0]).strip(),
            "visual_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
            "prefix_tokens": prefix, "kv_cache_bytes": kv_cache_bytes(model.config, prefix, model.dtype),
            "seconds": float(np.median(seconds)),
        })
    return results


@torch.inference_mode()
def kept_patches(model, processor, image: Image.Image, budget: int) -> np.ndarray:
    from .evidence import SELECTING

    pixels = processor(images=[image], text=[build_prompt("?")], vision_mode=SELECTING, shirg_budget=budget,
                       return_tensors="pt")["pixel_values"].to(model.device)
    selection = model.selector(model.vision_features(pixels), grid_size=model.config.highres_grid, budget=budget)
    return selection.kept_indices[0].cpu().numpy()


def demo_picture(image: Image.Image, native_side: int, grid: tuple[int, int], kept: np.ndarray, caption: str,
                 question: str, answers: list[str] | None, results: list[dict]) -> Image.Image:
    """Three panels (the image at the high-res side, what the native view gets, the kept tokens), the image's
    `caption` and the answers."""
    high = image.resize((PANEL, PANEL), Image.Resampling.NEAREST)
    native = image.resize((native_side, native_side), Image.Resampling.BICUBIC).resize((PANEL, PANEL),
                                                                                      Image.Resampling.NEAREST)
    rows, cols = grid
    mask = np.zeros(rows * cols, dtype=bool)
    mask[kept] = True
    cell = PANEL // cols
    mask = mask.reshape(rows, cols).repeat(cell, 0).repeat(cell, 1)[..., None]
    pixels = np.asarray(high, dtype=np.float32)
    overlay = Image.fromarray(np.where(mask, pixels, pixels * 0.25 + 150).astype(np.uint8))
    font = ImageFont.load_default(size=14)
    margin, line = 12, 20
    texts = [caption, f"Q: {question}" + ("" if answers is None else f"   truth: {' / '.join(answers)}")]
    texts += [f"{r['view']}: {r['answer']!r}  ({r['visual_tokens']} visual tokens, prefix {r['prefix_tokens']})"
              + ("" if answers is None else f"  {verdict(r['answer'], answers)}") for r in results]
    header = 2 * line
    canvas = Image.new("RGB", (3 * PANEL + 4 * margin, header + PANEL + margin + line * len(texts) + margin), "white")
    draw = ImageDraw.Draw(canvas)
    titles = (f"drawn at {image.width} px (high-res view)", f"native view ({native_side} px)",
              f"SHIRG: {len(kept)} kept of {rows * cols} patches")
    for index, (panel, title) in enumerate(zip((high, native, overlay), titles)):
        x = margin + index * (PANEL + margin)
        draw.text((x, margin // 2), title, fill="black", font=font)
        canvas.paste(panel, (x, header))
    for index, text in enumerate(texts):
        draw.text((margin, header + PANEL + margin + index * line), text, fill="black", font=font)
    return canvas
