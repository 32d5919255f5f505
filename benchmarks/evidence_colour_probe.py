"""How well an evidence model's tower carries a tag's frame colour at its glyphs (docs/EVIDENCE-RESULTS.md, run 17):
a linear probe from the tower feature of a tag glyph's native patch to the tag's colour, fitted on 70 % of the
glyphs and scored on the rest.

    python benchmarks/evidence_colour_probe.py --models shipped=shirg_hf/evidence_model

The glyphs are the answer glyphs of the `tags` questions that name a tag's colour ("What is in the cyan tag?",
"Which colour tag holds K?") among `--rows` rows of the `train` split at `--seed` (not a seed any training uses),
drawn at `--glyph-scale` (1.6: G0's). Every model is probed on the same glyphs and the same split.
"""

import argparse
import re
from pathlib import Path

import torch
from transformers import AutoModel

from shirg_hf.compare import wilson_interval
from shirg_hf.evidence import glyph_centre, model_image_processor, native_grid, patch_on_grid
from shirg_hf.synth import COLOUR_NAMES, EVIDENCE_GEOMETRY, FAMILIES, generate_sample

NAMED_TAG = re.compile(r"What is in the (\w+) tag\?")
HELD_OUT = 0.3
PROBE_STEPS = 500


def tag_glyphs(rows: int, seed: int, glyph_scale: float) -> tuple[list, list, torch.Tensor]:
    """(images, [(image index, native patch)] of each glyph, [glyphs] colour index of its tag)."""
    images, glyphs, colours = [], [], []
    for index in range(FAMILIES.index("tags"), rows, len(FAMILIES)):
        sample = generate_sample("train", seed, index, EVIDENCE_GEOMETRY, glyph_scale=glyph_scale)
        question, answer = sample.row["question"], sample.row["answers"][0]
        named = NAMED_TAG.match(question)
        if named is None and not question.startswith("Which colour tag holds"):
            continue
        colour = COLOUR_NAMES.index(named.group(1) if named else answer)
        for glyph in sample.answer_glyphs:
            glyphs.append((len(images), patch_on_grid(*glyph_centre(glyph), native_grid())))
            colours.append(colour)
        images.append(sample.image)
    return images, glyphs, torch.tensor(colours)


def glyph_features(model, images: list, glyphs: list, batch: int = 64) -> torch.Tensor:
    """[glyphs, D] the tower's native-view feature at each glyph's patch."""
    side = model.config.vision_config.image_size
    processor = model_image_processor(model)
    features = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            pixels = processor(images[start:start + batch], size={"height": side, "width": side}, do_anyres=False,
                               return_tensors="pt")["pixel_values"]
            features.append(model.vision_features(pixels))  # [b, N, D]
    features = torch.cat(features)
    return torch.stack([features[image, patch] for image, patch in glyphs])


def probe_accuracy(features: torch.Tensor, colours: torch.Tensor, seed: int) -> tuple[int, int]:
    """(correct, held-out glyphs) of a linear probe (standardised features, Adam, weight decay) on a fixed split."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(colours), generator=generator)
    cut = int((1 - HELD_OUT) * len(colours))
    fit, held = order[:cut], order[cut:]
    mean, std = features[fit].mean(0), features[fit].std(0) + 1e-6
    inputs = (features - mean) / std
    torch.manual_seed(seed)
    probe = torch.nn.Linear(features.shape[1], len(COLOUR_NAMES))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(PROBE_STEPS):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(inputs[fit]), colours[fit]).backward()
        optimizer.step()
    with torch.no_grad():
        correct = int((probe(inputs[held]).argmax(-1) == colours[held]).sum())
    return correct, len(held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", required=True, nargs="+", metavar="LABEL=FOLDER",
                        help="save_pretrained folders (a stage-1 folder or a shipped model: the tower is the same)")
    parser.add_argument("--rows", type=int, default=12000, help="train rows drawn (a third are `tags` rows)")
    parser.add_argument("--seed", type=int, default=5, help="train-split seed of the rows, and the probe's split")
    parser.add_argument("--glyph-scale", type=float, default=1.6, help="glyph scale of the rows (1.6: G0's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    models = [entry.partition("=")[::2] for entry in args.models]
    for label, folder in models:
        if not (Path(folder) / "config.json").is_file():
            parser.error(f"--models {label}={folder}: not a save_pretrained folder (no config.json there)")
    torch.set_num_threads(args.threads)
    images, glyphs, colours = tag_glyphs(args.rows, args.seed, args.glyph_scale)
    majority = int(torch.bincount(colours).max()) / len(colours)
    print(f"{len(colours)} tag glyphs in {len(images)} images; the most common colour is {100 * majority:.1f} %\n")
    print("| tower | frame colour from the glyph's patch, held-out accuracy % [95 % CI] |\n|---|---|")
    for label, folder in models:
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        correct, total = probe_accuracy(glyph_features(model, images, glyphs), colours, args.seed)
        low, high = wilson_interval(correct, total)
        print(f"| {label} | {100 * correct / total:.1f} [{100 * low:.1f}, {100 * high:.1f}] (n {total}) |")


if __name__ == "__main__":
    main()
