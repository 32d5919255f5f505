"""`shirg-hf generate`: answer a question about an image with a saved model folder (or Hub repo id)."""

import argparse
import time

import torch

from .devices import add_device_arguments, resolve_device, resolve_dtype
from .validation import check_model_source
from .processing.image_processing_shirg import load_image
from .processing.visual_tokens import ADAPTIVE_BUDGET


def load_model_and_processor(model_path: str, dtype: torch.dtype | str = "auto", device="cpu"):
    """A `ShirgLavidaForDiffusionLM` (in `dtype`, default as saved, on `device`) and its processor from a
    save_pretrained folder or repo id."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(model_path, dtype=dtype).to(device).eval()
    if model.config.model_type != "shirg_lavida":
        raise ValueError(f"{model_path} holds a {model.config.model_type!r} model; `generate` needs a shirg_lavida "
                         "model folder (from `shirg-hf demo --out`, `convert-lavida` or `export`).")
    return model, AutoProcessor.from_pretrained(model_path)


def answer_question(model, processor, image, question: str, budget: int | str | None = None, **generate_kwargs) -> dict:
    """Generate the answer to `question` about `image`; returns the text, ids and seconds taken."""
    from .processing.processing_shirg_lavida import build_prompt

    budget_kwargs = {"shirg_budget": budget} if budget is not None else {}
    inputs = processor(images=[image], text=[build_prompt(question)], return_tensors="pt", **budget_kwargs)
    inputs = inputs.to(model.device)
    started = time.perf_counter()
    with torch.inference_mode():
        answer_ids = model.generate(**inputs, **generate_kwargs)
    seconds = time.perf_counter() - started
    return {"answer": processor.decode(answer_ids[0]).strip(), "answer_ids": answer_ids[0].tolist(),
            "prefix_length": inputs["input_ids"].shape[1], "seconds": seconds}


def _budget(text: str):
    """--budget: an integer K or "adaptive"."""
    if text == ADAPTIVE_BUDGET:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer K or {ADAPTIVE_BUDGET!r}, got {text!r}") from None


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="answer a question about an image with a saved model",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="save_pretrained folder (or Hub repo id) of the model")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--question", required=True, help="question about the image")
    parser.add_argument("--budget", type=_budget, help="SHIRG budget K (shirg mode; default: the model's), or "
                        "'adaptive': K per image from its pixels within the model's selection.adaptive_budget")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer length L (default 32)")
    parser.add_argument("--block-length", type=int, help="diffusion block length (default: L)")
    parser.add_argument("--step-ratio", type=float, default=0.5, help="steps per block / block length (default 0.5)")
    add_device_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.question.strip():
        raise ValueError("--question must not be empty")
    check_model_source(args.model)
    device = resolve_device(args.device)
    image = load_image(args.image)
    model, processor = load_model_and_processor(args.model, resolve_dtype(args.dtype), device)
    result = answer_question(model, processor, image, args.question, args.budget,
                             max_new_tokens=args.max_new_tokens, block_length=args.block_length or args.max_new_tokens,
                             step_ratio=args.step_ratio)
    print(result["answer"])
    print(f"({result['prefix_length']} prefix tokens, {result['seconds']:.2f} s)")
    return 0
