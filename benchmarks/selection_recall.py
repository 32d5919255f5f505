"""Evidence recall of SHIRG's score terms, their pairs, the seed-literal weights and candidate selectors (issue 15).

Runs `shirg-hf compare --recall-only` (the same code path, in process) on a synth VALIDATION folder after
registering one selection method per candidate, and prints one table: evidence recall % per K. Every choice
documented in docs/selection.md comes from this script on the `val` split; never run it on `test` for tuning.

    shirg-hf synth --out data/val --split val --n 1000 --seed 0
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/selection_recall.py --data data/val --tower random-evidence \
        --out runs/recall-val-random
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/selection_recall.py --data data/val \
        --tower shirg_hf/evidence_model --out runs/recall-val-trained

`--tower`: a model folder (its `vision_tower.*` weights and its config), `tiny`, or `random-evidence` (a seeded
random tower in the evidence model's geometry: 128 px, 16 x 16 patches, 4 layers, saved under --out).
"""

import argparse
import json
from pathlib import Path

import torch

from shirg_hf.compare import run_compare
from shirg_hf.modeling.selection_shirg import score_components
from shirg_hf.modeling.visual_tokens import SCORE_TERMS, SELECTION_METHODS, register_selection_method

# name: (weights over importance / magnitude / gradient, importance source, coverage cells?)
CANDIDATES = {
    "c_i": ((1, 0, 0), "similarity", True),
    "c_m": ((0, 1, 0), "similarity", True),
    "c_g": ((0, 0, 1), "similarity", True),
    "c_im": ((0.5, 0.5, 0), "similarity", True),
    "c_ig": ((0.5, 0, 0.5), "similarity", True),
    "c_mg": ((0, 0.5, 0.5), "similarity", True),
    "c_seed": ((0.6, 0.25, 0.15), "similarity", True),
    "c_ig37": ((0.3, 0, 0.7), "similarity", True),
    "c_igm": ((0.35, 0.1, 0.55), "similarity", True),
    "att": ((1, 0, 0), "attention", False),
    "c_att": ((1, 0, 0), "attention", True),
    "c_attn": ((1, 0, 0), "attention_normalised", True),
    "c_att_g": ((0.5, 0, 0.5), "attention", True),
    "c_attn_g": ((0.5, 0, 0.5), "attention_normalised", True),
    "c_att_seed": ((0.6, 0.25, 0.15), "attention", True),
    "c_attn_seed": ((0.6, 0.25, 0.15), "attention_normalised", True),
    "n_ig37": ((0.3, 0, 0.7), "similarity", False),
    "n_ig15": ((0.15, 0, 0.85), "similarity", False),
    "n_attn_g37": ((0.3, 0, 0.7), "attention_normalised", False),
    "c_attn_g37": ((0.3, 0, 0.7), "attention_normalised", True),
    "c_ig10": ((0.1, 0, 0.9), "similarity", True),
    "n_ig10": ((0.1, 0, 0.9), "similarity", False),
    "c_ig05": ((0.05, 0, 0.95), "similarity", True),
    "n_ig05": ((0.05, 0, 0.95), "similarity", False),
}
BUDGETS = {"tiny": (32, 48, 64), "evidence": (56, 84, 112)}


def register_candidates() -> None:
    for name, (weights, importance, coverage) in CANDIDATES.items():
        if name in SELECTION_METHODS:
            continue

        def score(features, grid_size, settings, attention=None, _weights=weights, _importance=importance, **inputs):
            names = tuple(term for weight, term in zip(_weights, SCORE_TERMS) if weight > 0)
            parts = score_components(features, grid_size, attention, names, _importance)
            return sum(weight * parts[term] for weight, term in zip(_weights, SCORE_TERMS) if term in parts)

        register_selection_method(name, uses_coverage=coverage, requires=("attention",) if importance != "similarity"
                                  else (), description=f"issue 15 candidate {weights} {importance}")(score)


def random_evidence_tower(folder: Path) -> Path:
    from shirg_hf.evidence import build_evidence_tokenizer, evidence_config, evidence_processor
    from shirg_hf.modeling.modeling_shirg_lavida import ShirgLavidaForDiffusionLM

    if not (folder / "processor_config.json").is_file():
        tokenizer = build_evidence_tokenizer()
        config = evidence_config(tokenizer)
        torch.manual_seed(0)
        ShirgLavidaForDiffusionLM(config).save_pretrained(folder)
        evidence_processor(config, tokenizer).save_pretrained(folder, overwrite=True)
    return folder


def with_coverage_cells(folder: Path, cells: tuple[int, int], out: Path) -> Path:
    """A copy of model folder `folder` whose `selection.coverage_cells` is `cells` (every covered method uses it)."""
    import shutil

    copy = out / f"tower-cells-{cells[0]}x{cells[1]}"
    shutil.copytree(folder, copy, dirs_exist_ok=True)
    config = json.loads((copy / "config.json").read_text())
    config["selection"]["coverage_cells"] = list(cells)
    (copy / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return copy


def adaptive_recall(data: str, tower_source: str, k_range: tuple[int, int], limit: int | None = None) -> dict:
    """Evidence recall and mean K of `shirg` with adaptive K (the processor's pixel signal, `adaptive_budget`)."""
    import datasets
    import numpy as np

    from shirg_hf.compare import _batch_inputs, load_tower, tower_config, tower_features
    from shirg_hf.modeling.selection_shirg import ShirgSelector
    from shirg_hf.modeling.visual_tokens import ADAPTIVE_EDGE_THRESHOLD, adaptive_budget
    from shirg_hf.processing.image_processing_shirg import ShirgImageProcessor, busy_patch_count

    config = tower_config(tower_source)
    tower = load_tower(tower_source, config)
    dataset = datasets.load_from_disk(data)
    rows = list(range(len(dataset) if limit is None else min(limit, len(dataset))))
    side = config.highres_image_size
    image_processor = ShirgImageProcessor(size={"height": side, "width": side})
    settings = {**config.selection, "adaptive_budget": list(k_range)}
    recalls, budgets = [], []
    for start in range(0, len(rows), 32):
        _, images, masks = _batch_inputs(dataset, Path(data), rows[start:start + 32], config)
        pixels = image_processor(images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            features = tower_features(tower, config, pixels)
        for view, feature, mask in zip(pixels, features, masks):
            budget = adaptive_budget(busy_patch_count(view, config.geometry.patch_size, ADAPTIVE_EDGE_THRESHOLD),
                                     settings)
            kept = ShirgSelector(**{**settings, "budget": budget})(feature[None], grid_size=config.highres_grid)
            if mask.sum():
                recalls.append(float(mask[kept.kept_indices[0].numpy()].sum()) / float(mask.sum()))
            budgets.append(budget)
    return {"k_range": list(k_range), "mean_k": float(np.mean(budgets)), "min_k": min(budgets),
            "max_k": max(budgets), "recall": float(np.mean(recalls))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a synth VALIDATION folder")
    parser.add_argument("--tower", required=True, help="model folder, 'tiny' or 'random-evidence'")
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--adaptive", type=int, nargs=2, metavar=("K_MIN", "K_MAX"),
                        help="only measure shirg with adaptive K in [K_MIN, K_MAX] (mean K and recall)")
    parser.add_argument("--coverage-cells", type=int, nargs=2, metavar=("ROWS", "COLS"),
                        help="measure with these coverage cells instead of the tower folder's")
    args = parser.parse_args(argv)
    out = Path(args.out)
    register_candidates()
    tower = args.tower
    if tower == "random-evidence":
        tower = str(random_evidence_tower(out / "random-evidence-tower"))
    if args.coverage_cells:
        tower = str(with_coverage_cells(Path(tower), tuple(args.coverage_cells), out))
    if args.adaptive:
        result = adaptive_recall(args.data, tower, tuple(args.adaptive), args.limit)
        out.mkdir(parents=True, exist_ok=True)
        (out / "adaptive.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
        return
    budgets = BUDGETS["tiny" if tower == "tiny" else "evidence"]
    names = ["shirg", "no_coverage", "importance", "magnitude", "gradient", "random", *CANDIDATES, "oracle"]
    variants = ",".join(f"{name}:{k}" for k in budgets for name in names)
    results = run_compare(args.data, variants, out / "compare", tower=tower, recall_only=True, limit=args.limit,
                          batch_size=32, overwrite=True, progress=False)
    recall = {entry["variant"]: entry["evidence_recall"] for entry in results["variants"]}
    rows = ["| method | " + " | ".join(f"K = {k}" for k in budgets) + " | description |",
            "|---|" + "---|" * (len(budgets) + 1)]
    for name in names:
        cells = " | ".join(f"{100 * recall[f'{name}:{k}']:.1f}" for k in budgets)
        description = CANDIDATES.get(name, ("", "", ""))
        rows.append(f"| {name} | {cells} | {description if name in CANDIDATES else ''} |")
    table = "\n".join(rows)
    (out / "recall_table.md").write_text(f"data {args.data}, tower {args.tower}, "
                                         f"{results['num_questions']} questions\n\n{table}\n")
    (out / "recall.json").write_text(json.dumps(recall, indent=1))
    print(table)


if __name__ == "__main__":
    main()
