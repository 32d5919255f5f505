"""End-to-end cost per vision mode on one mid-size model: prefix tokens, KV-cache bytes, seconds per answer.

One randomly initialised model (SigLIP-shaped tower at 384/672 px, patch 14; a mid-size LLaDA) runs every mode
side by side on the same image and question, so the ratios are comparable on a noisy machine. The vision time
(tower + selection + projector) is reported separately from the diffusion generation (prefix encode + steps).

    python benchmarks/bench_end_to_end.py [--repeats 3] [--max-new-tokens 32] [--step-ratio 0.5]
"""

import argparse
import statistics
import time

import torch
from PIL import Image

from shirg_hf import LladaConfig, ShirgLavidaConfig, ShirgLavidaForDiffusionLM, ShirgLavidaProcessor, build_prompt
from shirg_hf.demo import kv_cache_bytes, make_demo_image
from shirg_hf.tokenization import build_tiny_tokenizer

MODES = (("lowres", None), ("lavida-hd", None), ("full", None), ("shirg", 512), ("shirg", 768), ("shirg", 1024))


def mid_size_config() -> ShirgLavidaConfig:
    vision = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                  image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                  vision_use_head=False)
    text = LladaConfig.tiny(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                            num_key_value_heads=16)
    return ShirgLavidaConfig(vision_config=vision, text_config=text.to_dict(), image_token_id=504)


def median_seconds(function, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--step-ratio", type=float, default=0.5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = mid_size_config()
    model = ShirgLavidaForDiffusionLM(config).eval()
    tokenizer = build_tiny_tokenizer()
    image = make_demo_image().resize((700, 500), Image.Resampling.BICUBIC)
    text = [build_prompt("What is the total on the invoice?")]
    generate_kwargs = dict(max_new_tokens=args.max_new_tokens, block_length=args.max_new_tokens,
                           step_ratio=args.step_ratio)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; tower hidden "
          f"{config.vision_config.hidden_size} x {config.vision_config.num_hidden_layers} layers; LLaDA hidden "
          f"{config.text_config.hidden_size} x {config.text_config.num_hidden_layers} layers; answer L = "
          f"{args.max_new_tokens}, {int(args.max_new_tokens * args.step_ratio)} steps; median of {args.repeats}")
    rows = []
    for mode, budget in MODES:
        mode_config = ShirgLavidaConfig.from_dict({**config.to_dict(), "vision_mode": mode})
        processor = ShirgLavidaProcessor.from_model_config(mode_config, tokenizer)
        call = {"shirg_budget": budget} if budget else {}
        inputs = processor(images=[image], text=text, return_tensors="pt", **call)
        prefix_length = inputs["input_ids"].shape[1]
        visual_tokens = int((inputs["input_ids"] == config.image_token_id).sum())
        with torch.inference_mode():
            vision = median_seconds(lambda: model.get_image_features(
                inputs["pixel_values"], mode, inputs.get("image_sizes"), budget), args.repeats)
            total = median_seconds(lambda: model.generate(**inputs, **generate_kwargs), args.repeats)
        label = f"{mode} K={budget}" if budget else mode
        rows.append((label, visual_tokens, prefix_length, kv_cache_bytes(config, prefix_length, torch.float32),
                     vision, total))

    baseline = rows[0][5]
    print(f"\n| mode | visual tokens | prefix tokens | KV cache (MiB) | vision s | s / answer | vs lowres |")
    print("|---|---|---|---|---|---|---|")
    for label, visual, prefix, cache_bytes, vision, total in rows:
        print(f"| {label} | {visual} | {prefix} | {cache_bytes / 2**20:.1f} | {vision:.3f} | {total:.3f} | "
              f"{total / baseline:.2f}x |")


if __name__ == "__main__":
    main()
