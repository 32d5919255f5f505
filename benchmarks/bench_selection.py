"""Benchmark SHIRG selection against the SigLIP so400m forward it follows.

Times `ShirgSelector` on N = 2,304 patches x D = 1,152 (672 px at patch 14) for batch 1 and 8, K in
{512, 768, 1024}, float32 and bfloat16 inputs (median ms per image), the baselines side by side at K = 768, and,
in the same run, one forward of the full-size truncated so400m tower (26 layers, random init) at 672 px per
dtype, so the selection / forward ratio is printed. Goal: selection <= 1% of the forward on CPU, in fp32 and in bf16
(bf16 features score with a bf16 Gram in symmetric tiles, see docs/selection.md); the fraction of kept patches that
bf16 and fp32 selections share is printed too. On a shared machine run it as `nice -n 19` and read the ratios, which
come from the same run, not the absolute times.

    python benchmarks/bench_selection.py                 # CPU, ~2-3 minutes on 2 cores
    python benchmarks/bench_selection.py --device cuda   # when a GPU is available

The tower's output features feed the selector, so scores see a realistic (if untrained) feature distribution.
"""

import argparse
import os
import platform
import statistics
import time

import torch

from shirg_hf import ShirgSelector, selection_method_names
from shirg_hf.modeling.configuration_shirg_lavida import SO400M_TRUNCATED

GRID = (48, 48)
IMAGE_SIDE = 672
BUDGETS = (512, 768, 1024)
BATCHES = (1, 8)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = selection_method_names()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process over all its threads) of one call."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def ms_per_image(fn, batch: int, repeats: int, device: torch.device) -> tuple[float, float, float]:
    """(median wall, best wall, median CPU) ms per image over `repeats` calls after one warm-up call."""
    fn()
    walls, cpus = zip(*(timed(fn, device) for _ in range(repeats)), strict=True)
    return statistics.median(walls) * 1e3 / batch, min(walls) * 1e3 / batch, statistics.median(cpus) * 1e3 / batch


def tower_forward(device: torch.device, dtype: torch.dtype, tower) -> tuple[tuple[float, float], torch.Tensor]:
    """One 672 px forward of the truncated so400m tower: ((wall s, CPU s), raw last-layer features [1, 2304, 1152])."""
    pixels = torch.rand(1, 3, IMAGE_SIDE, IMAGE_SIDE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pixels = pixels.to(device=device, dtype=dtype)
    with torch.inference_mode():
        holder = {}

        def forward():
            embeddings = tower.embeddings(pixels, interpolate_pos_encoding=True)
            holder["features"] = tower.encoder(inputs_embeds=embeddings).last_hidden_state  # no post_layernorm

        seconds = timed(forward, device)
    return seconds, holder["features"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per setting (median)")
    args = parser.parse_args()
    device = torch.device(args.device)

    cpu_name = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name}, device {device}, "
          f"load average {os.getloadavg()[0]:.2f}")
    from transformers import SiglipVisionConfig, SiglipVisionModel

    start = time.perf_counter()
    torch.manual_seed(0)
    tower = SiglipVisionModel(SiglipVisionConfig(**SO400M_TRUNCATED)).eval().to(device)
    print(f"random init of the so400m tower (26 layers): {time.perf_counter() - start:.1f} s")

    forward_ms, features = {}, {}  # forward_ms[dtype] = (wall ms, CPU ms)
    for name, dtype in DTYPES.items():
        tower.to(dtype)
        (wall, cpu), output = tower_forward(device, dtype, tower)
        forward_ms[name] = (wall * 1e3, cpu * 1e3)
        # Batch of 8 distinct images: the tower output plus a fixed per-image perturbation.
        noise = torch.randn(7, *output.shape[1:], generator=torch.Generator().manual_seed(1)).to(device, dtype)
        features[name] = torch.cat([output, output + 0.1 * output.std() * noise])  # [8, 2304, 1152]
        print(f"so400m forward at {IMAGE_SIDE} px, {name}: {wall:.2f} s wall, {cpu:.2f} s CPU")
    del tower

    print(f"\n### Selection time per image (median; N = {GRID[0] * GRID[1]}, D = 1152, method shirg)\n")
    print("Ratios are to one so400m forward at 672 px in the same dtype: median wall to wall, CPU to CPU time.\n")
    print("| dtype | batch | K | wall ms (median) | wall ms (best) | CPU ms | wall % of forward | CPU % of forward |")
    print("|---|---|---|---|---|---|---|---|")
    for name in DTYPES:
        for batch in BATCHES:
            repeats = args.repeats if batch == 1 else max(2, args.repeats // 2)
            for budget in BUDGETS:
                selector = ShirgSelector(budget=budget)
                inputs = features[name][:batch]
                with torch.inference_mode():
                    wall, best, cpu = ms_per_image(lambda: selector(inputs, grid_size=GRID), batch, repeats, device)
                print(f"| {name} | {batch} | {budget} | {wall:.1f} | {best:.1f} | {cpu:.1f} | "
                      f"{100 * wall / forward_ms[name][0]:.2f}% | {100 * cpu / forward_ms[name][1]:.2f}% |")

    print("\n### Variants (fp32, batch 1, K = 768)\n")
    print("| method | wall ms (median) | wall ms (best) | CPU ms | wall % of forward | CPU % of forward |")
    print("|---|---|---|---|---|---|")
    for method in VARIANTS:
        selector = ShirgSelector(method=method, budget=768)
        with torch.inference_mode():
            wall, best, cpu = ms_per_image(lambda: selector(features["fp32"][:1], grid_size=GRID), 1, args.repeats,
                                           device)
        print(f"| {method} | {wall:.1f} | {best:.1f} | {cpu:.1f} | {100 * wall / forward_ms['fp32'][0]:.2f}% | "
              f"{100 * cpu / forward_ms['fp32'][1]:.2f}% |")

    print("\n### bf16 vs fp32 selections (shirg; the 8 fp32 feature maps above and their bf16 cast)\n")
    print("Fraction of kept patches shared. 'bf16 Gram': the bf16 features scored by the bf16 path vs the same "
          "values scored in fp32 (the Gram's effect alone); 'bf16 features': the bf16 path vs the fp32 features "
          "(rounding the features to bf16 included).\n")
    print("| K | bf16 Gram: mean | min | bf16 features: mean | min |")
    print("|---|---|---|---|---|")
    for budget in BUDGETS:
        selector = ShirgSelector(budget=budget)
        low = features["fp32"].to(torch.bfloat16)
        with torch.inference_mode():
            exact = selector(features["fp32"], grid_size=GRID).kept_indices
            widened = selector(low.float(), grid_size=GRID).kept_indices
            reduced = selector(low, grid_size=GRID).kept_indices
        cells = []
        for reference in (widened, exact):
            shared = [len(set(a.tolist()) & set(b.tolist())) / budget for a, b in zip(reference, reduced, strict=True)]
            cells += [f"{statistics.mean(shared):.4f}", f"{min(shared):.4f}"]
        print(f"| {budget} | {' | '.join(cells)} |")

    selector = ShirgSelector(budget=768)
    trainable = features["fp32"][:1].clone().requires_grad_(True)

    def forward_backward():
        selector(trainable, grid_size=GRID).tokens.sum().backward()

    wall, best, cpu = ms_per_image(forward_backward, 1, args.repeats, device)
    print(f"\nshirg K=768 fp32 batch 1 with backward to the features (training): {wall:.1f} ms wall (median), "
          f"{best:.1f} ms (best), {cpu:.1f} ms CPU")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
