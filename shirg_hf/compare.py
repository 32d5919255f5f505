"""`shirg-hf compare`: one model, the same questions, every vision mode and token selector side by side.

A variant is a vision mode (`lowres`: the tower's native view; `full`: every high-res patch) or `METHOD:K`, a
selection method of `ShirgSelector` (`shirg`, `random`, `pooled`, `gradient`, ...) at budget K, or `oracle:K`:
the patches that hold the answer (from the data's `evidence_boxes`) first, then the rest by the SHIRG score
without coverage cells; `METHOD:KMIN-KMAX` runs the method with adaptive K (the processor picks each image's K in
[KMIN, KMAX] from its pixels; visual tokens are then per question). Every variant answers through the normal
processor + `generate()` path. The data is a
`shirg-hf synth` set (the `eval` schema plus `question_type`, `answer_glyphs` and `evidence_boxes`).

Per variant, `results.json` / `results.md` give: visual tokens, prefix tokens, prefix KV-cache bytes (means per
question), exact-match accuracy (case and spacing ignored) with a 95 % Wilson interval, overall, per
`question_type` and per `answer_glyphs`; forward passes per answer and tokens decoded per forward; evidence
recall (the fraction of evidence patches kept; 1 for `lowres` and `full` by definition; a `pooled` token counts
for every patch it averages, so `pooled` is 1 too; questions without evidence patches are left out); and seconds
per answer (processor + generate, after one untimed warm-up batch per variant) relative to `lowres` in the same
run. `accuracy_vs_tokens.png` plots accuracy against visual tokens, one marker per variant.

`--recall-only` needs no LM: `--tower DIR-or-preset` (a model folder, of which only the vision tower is loaded,
or `tiny` / `lavida` for a seeded random tower) encodes each image once and every variant's selector runs on the
features; the results hold recall only (figure: `recall_vs_tokens.png`).

`--out` is resumable like `eval`: `predictions.jsonl` gets one line per (variant, question), flushed after every
batch (a crash loses at most one batch); the same command resumes; other settings are refused without
`--overwrite`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from .data import (
    check_columns, check_images, image_sources, load_vqa_data, pick_split, question_ids, sha256_of_files, with_answers,
)
from .evaluation import (
    DTYPES, PREDICTIONS_NAME, add_decoding_arguments, bad_images_message, find_bad_images, model_fingerprint,
    prepare_output, read_model_config, read_predictions, resolve_generation_config,
)
from .devices import add_device_arguments, resolve_device, resolve_dtype
from .fileio import atomic_file, exclusive_lock, write_json_atomically
from .modeling.visual_tokens import (
    ADAPTIVE_BUDGET, ADAPTIVE_EDGE_THRESHOLD, DEFAULT_VISION_MODE, adaptive_budget, check_selection,
    get_selection_method, get_vision_mode, num_image_tokens, selection_method_names, vision_mode_names,
)
from .processing.image_processing_shirg import busy_patch_count, load_image

ORACLE = "oracle"
ORACLE_FILL_METHOD = "no_coverage"  # after the evidence patches, the oracle fills by the SHIRG score, no coverage
TOWER_PRESETS = ("tiny", "lavida")
SYNTH_COLUMNS = ("question_type", "answer_glyphs", "evidence_boxes")
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
ACCURACY_FIGURE, RECALL_FIGURE = "accuracy_vs_tokens.png", "recall_vs_tokens.png"
WILSON_Z = 1.959963984540054  # two-sided 95 %
TOWER_SEED = 0  # initialisation of the random preset towers
FIGURE_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
                  (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


# ---- variants ----------------------------------------------------------------------------------------------
def vision_mode_variants() -> tuple[str, ...]:
    """The registered vision modes that need neither a budget nor each image's size (`lowres`, `full`, ...)."""
    return tuple(name for name in vision_mode_names()
                 if not get_vision_mode(name).selects and not get_vision_mode(name).anyres)


@dataclass(frozen=True)
class Variant:
    """A vision mode (`lowres`, `full`), a selection method at budget K (the selecting vision mode), or one with
    adaptive K in [K_min, K_max] (`METHOD:KMIN-KMAX`: the processor picks K per image)."""

    name: str
    vision_mode: str
    method: str | None = None
    budget: int | None = None
    adaptive: tuple[int, int] | None = None

    @property
    def selector_method(self) -> str | None:
        return ORACLE_FILL_METHOD if self.method == ORACLE else self.method


def selection_methods() -> tuple[str, ...]:
    """The registered methods that select (not `keeps_all`), and the oracle."""
    return tuple(name for name in selection_method_names() if not get_selection_method(name).keeps_all) + (ORACLE,)


def make_selector(variant: Variant, config):
    """The variant's ShirgSelector with the model's other selection settings (cells, weights, summary, ...)."""
    from .modeling.selection_shirg import ShirgSelector

    if variant.adaptive is None:
        return ShirgSelector(**{**config.selection, "method": variant.selector_method, "budget": variant.budget})
    return ShirgSelector(**{**config.selection, "method": variant.selector_method, "budget": variant.adaptive[1],
                            "adaptive_budget": variant.adaptive})


def image_budget(variant: Variant, pixel_values, config) -> int:
    """K of one image under an adaptive variant, from its preprocessed high-res view [3, S, S] (the processor's
    rule, `adaptive_budget`)."""
    busy = busy_patch_count(pixel_values, config.geometry.patch_size, ADAPTIVE_EDGE_THRESHOLD)
    return adaptive_budget(busy, {"adaptive_budget": list(variant.adaptive)})


def parse_variants(text: str, config) -> list[Variant]:
    """`lowres,full,shirg:84,oracle:84,...` -> variants, each checked against the model's patch grid."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--variants must be distinct comma-separated names, got {text!r}")
    variants = []
    for name in names:
        if name in vision_mode_variants():
            variants.append(Variant(name, name))
            continue
        method, _, budget = name.partition(":")
        low, dash, high = budget.partition("-")
        if method not in selection_methods() or not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"--variants {name!r}: expected {' or '.join(vision_mode_variants())}, METHOD:K or "
                             f"METHOD:KMIN-KMAX (adaptive K) with METHOD among {', '.join(selection_methods())} and "
                             "K integers")
        if dash and (method == ORACLE or int(low) > int(high)):
            raise ValueError(f"--variants {name!r}: adaptive K needs KMIN <= KMAX and a method other than "
                             f"{ORACLE!r} (it ranks each image's evidence first at a fixed K)")
        variant = Variant(name, DEFAULT_VISION_MODE, method, None, (int(low), int(high))) if dash else \
            Variant(name, DEFAULT_VISION_MODE, method, int(low))
        try:
            for k in variant.adaptive or (variant.budget,):
                make_selector(variant, config).check_budget(k, config.num_highres_patches)
        except ValueError as error:
            raise ValueError(f"--variants {name!r} does not fit this model: {error}") from None
        variants.append(variant)
    return variants


def visual_tokens(variant: Variant, config, budget: int | None = None) -> int:
    """Visual tokens one image takes in the prompt under `variant` (`budget`: that image's K, adaptive only)."""
    if variant.method is None:
        return num_image_tokens(variant.vision_mode, config.geometry, config.selection)
    if (variant.adaptive is None) != (budget is None):
        raise ValueError(f"visual_tokens: pass the image's K for the adaptive variant {variant.name!r} only")
    return make_selector(variant, config).num_output_tokens(config.num_highres_patches, budget or variant.budget)


# ---- evidence ----------------------------------------------------------------------------------------------
def evidence_mask(boxes, image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """[N] bool: the patches of the `grid` (rows, cols) over an image of `image_size` (w, h) that overlap a box.

    Patch column c covers x in [c W / cols, (c + 1) W / cols); a box [x0, x1) overlaps columns
    floor(x0 cols / W) .. ceil(x1 cols / W) - 1 (rows likewise).
    """
    width, height = image_size
    rows, cols = grid
    mask = np.zeros((rows, cols), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0 * rows // height: -(-y1 * rows // height), x0 * cols // width: -(-x1 * cols // width)] = True
    return mask.reshape(-1)


def evidence_recall(variant: Variant, mask: np.ndarray, kept=None) -> float | None:
    """Fraction of the evidence patches `mask` [N] kept (None without evidence patches)."""
    total = int(mask.sum())
    if total == 0:
        return None
    if variant.method is None or get_selection_method(variant.selector_method).builder is not None:
        return 1.0  # every patch is in the prompt, alone or averaged into a pooled token
    return float(mask[np.asarray(kept)].sum()) / total


class VariantSelector(nn.Module):
    """Stands in for `model.selector` during a variant: runs its selector with the batch's oracle priority and
    remembers the kept patches of every call (the model calls it once per image under adaptive K)."""

    def __init__(self, selector):
        super().__init__()
        self.selector = selector
        self.priority = None
        self.kept_calls = []

    def needs_attention(self, method=None) -> bool:
        return self.selector.needs_attention(method)

    @property
    def settings(self) -> dict:
        return self.selector.settings

    def forward(self, features, grid_size=None, budget=None, attentions=None, method=None, inputs=None):
        output = self.selector(features, grid_size=grid_size, budget=budget, attentions=attentions, method=method,
                               inputs=inputs, priority=self.priority)
        self.kept_calls.append(output.kept_indices)
        return output

    def kept_rows(self) -> list:
        """The kept patch indices of every image since the last `kept_calls` reset, in order ([K_i] arrays)."""
        return [row.cpu().numpy() for call in self.kept_calls for row in call]


@contextlib.contextmanager
def selector_swapped(model, selector):
    """`model.selector` is `selector` inside the block."""
    original = model.selector
    model.selector = selector
    try:
        yield
    finally:
        model.selector = original


# ---- scoring -----------------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    return " ".join(str(text).lower().split())


def exact_match(prediction: str, answers: list[str]) -> bool:
    return normalize_answer(prediction) in {normalize_answer(answer) for answer in answers}


def wilson_interval(correct: int, total: int, z: float = WILSON_Z) -> tuple[float, float]:
    """The Wilson score interval of a proportion correct / total."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    low = 0.0 if correct == 0 else max(0.0, centre - half)  # exact ends where rounding would leave 1e-17
    high = 1.0 if correct == total else min(1.0, centre + half)
    return low, high


def paired_difference(records: list[dict], reference: list[dict], key: str = "correct", z: float = WILSON_Z
                      ) -> dict:
    """Mean per-question difference `records - reference` of `key` (correct or recall) over the questions both
    answered, with a two-sided normal 95 % interval of the paired differences (for 0/1 outcomes the paired
    proportion interval from the discordant pairs). Pairs where either value is None (no evidence patches)
    are skipped; two runs of different question sets raise."""
    values = {record["question_id"]: record[key] for record in reference}
    if {record["question_id"] for record in records} != set(values):
        raise ValueError("paired_difference needs both runs on the same questions; run `compare` on the same "
                         "data (and --limit) for both")
    diffs = [float(record[key]) - float(values[record["question_id"]]) for record in records
             if record[key] is not None and values[record["question_id"]] is not None]
    if not diffs:
        raise ValueError(f"paired_difference: no question has {key!r} in both runs")
    n = len(diffs)
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(variance / n)
    return {"difference": mean, "ci95": [mean - half, mean + half], "n": n}


def accuracy_summary(records: list[dict]) -> dict:
    correct, total = sum(bool(record["correct"]) for record in records), len(records)
    low, high = wilson_interval(correct, total)
    return {"accuracy": correct / total if total else None, "ci95": [low, high], "correct": correct, "n": total}


def mean_or_none(values) -> float | None:
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else None


def group_by(records: list[dict], key: str) -> dict:
    groups = {}
    for record in records:
        groups.setdefault(str(record[key]), []).append(record)
    return dict(sorted(groups.items()))


def summarize(variants: list[Variant], records: list[dict], recall_only: bool) -> list[dict]:
    """One summary per variant from its answered records."""
    by_variant = group_by(records, "variant")
    summaries = []
    for variant in variants:
        rows = by_variant.get(variant.name, [])
        summary = {
            "variant": variant.name, "vision_mode": variant.vision_mode, "method": variant.method,
            "budget": variant.budget, "adaptive_budget": None if variant.adaptive is None else list(variant.adaptive),
            "answered": len(rows),
            "visual_tokens": mean_or_none(r["visual_tokens"] for r in rows),
            "evidence_recall": mean_or_none(r["recall"] for r in rows),
            "recall_by_question_type": {name: mean_or_none(r["recall"] for r in group)
                                        for name, group in group_by(rows, "question_type").items()},
        }
        if not recall_only:
            summary.update({
                "prefix_tokens": mean_or_none(r["prefix_tokens"] for r in rows),
                "kv_cache_bytes": mean_or_none(r["kv_cache_bytes"] for r in rows),
                **accuracy_summary(rows),
                "by_question_type": {name: accuracy_summary(group)
                                     for name, group in group_by(rows, "question_type").items()},
                "by_answer_glyphs": {name: accuracy_summary(group)
                                     for name, group in group_by(rows, "answer_glyphs").items()},
                "seconds_per_answer": mean_or_none(r["seconds"] for r in rows),
                "forward_passes_per_answer": mean_or_none(r.get("forward_passes") for r in rows),
                "tokens_per_forward": mean_or_none(r.get("tokens_per_forward") for r in rows),
            })
        summaries.append(summary)
    if not recall_only:
        native = next(name for name in vision_mode_names() if get_vision_mode(name).view_side == "native")
        reference = next((s["seconds_per_answer"] for s in summaries if s["variant"] == native), None)
        for summary in summaries:
            seconds = summary["seconds_per_answer"]
            summary["relative_seconds"] = seconds / reference if reference and seconds is not None else None
    return summaries


# ---- reports -----------------------------------------------------------------------------------------------
def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _accuracy_cell(entry: dict) -> str:
    if entry["accuracy"] is None:
        return "-"
    low, high = entry["ci95"]
    return f"{100 * entry['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}] (n {entry['n']})"


def markdown_report(results: dict) -> str:
    """results.md: the main table, then accuracy per question type and per answer length."""
    summaries, recall_only = results["variants"], results["recall_only"]
    lines = [f"# shirg-hf compare: {results['num_questions']} questions of {results['data']}", ""]
    if recall_only:
        types = sorted({name for s in summaries for name in s["recall_by_question_type"]})
        recall_columns = " | ".join(f"recall {t} %" for t in types)
        lines += [f"| variant | visual tokens | evidence recall % | {recall_columns} |",
                  "|---|---|---|" + "---|" * len(types)]
        for s in summaries:
            cells = [_percent(s["recall_by_question_type"].get(t)) for t in types]
            lines.append(f"| {s['variant']} | {s['visual_tokens']:.0f} | {_percent(s['evidence_recall'])} | "
                         + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"
    lines += ["| variant | visual tokens | prefix tokens | KV cache (KiB) | accuracy % [95 % CI] | evidence recall % "
              "| s / answer vs lowres | forward passes / answer | tokens / forward |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        relative = "-" if s["relative_seconds"] is None else f"{s['relative_seconds']:.2f}x"
        passes, rate = s.get("forward_passes_per_answer"), s.get("tokens_per_forward")
        lines.append(f"| {s['variant']} | {s['visual_tokens']:.0f} | {s['prefix_tokens']:.1f} | "
                     f"{s['kv_cache_bytes'] / 1024:.1f} | {_accuracy_cell(s)} | {_percent(s['evidence_recall'])} | "
                     f"{relative} | {'-' if passes is None else f'{passes:.1f}'} | "
                     f"{'-' if rate is None else f'{rate:.2f}'} |")
    for key, title in (("by_question_type", "question type"), ("by_answer_glyphs", "answer glyphs")):
        groups = sorted({name for s in summaries for name in s[key]})
        lines += ["", f"Accuracy % [95 % CI] per {title}:", "",
                  f"| variant | {' | '.join(groups)} |", "|---|" + "---|" * len(groups)]
        for s in summaries:
            cells = [_accuracy_cell(s[key][name]) if name in s[key] else "-" for name in groups]
            lines.append(f"| {s['variant']} | {' | '.join(cells)} |")
    lines += ["", f"Torch threads: {results['threads']}; seconds are processor + generate per answer, after one "
              "warm-up batch per variant."]
    return "\n".join(lines) + "\n"


def tradeoff_figure(points: list[tuple], y_label: str, title: str):
    """A PIL scatter plot: points (label, x tokens, y in [0, 1], (low, high) or None), one marker each, with a legend.

    Markers at the same x are spread a few pixels apart so that their intervals stay visible.
    """
    import PIL.Image
    import PIL.ImageDraw
    import PIL.ImageFont

    width, height, left, plot_right, top, bottom = 860, 480, 60, 640, 40, 60
    image = PIL.Image.new("RGB", (width, height), "white")
    draw = PIL.ImageDraw.Draw(image)
    font = PIL.ImageFont.load_default()
    x_max = max(point[1] for point in points) * 1.08 or 1.0

    def to_px(x: float, y: float) -> tuple[float, float]:
        return left + x / x_max * (plot_right - left), height - bottom - y * (height - top - bottom)

    for tick in range(0, 11, 2):
        _, y = to_px(0, tick / 10)
        draw.line([(left, y), (plot_right, y)], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{tick * 10}%", fill="black", font=font, anchor="rm")
    magnitude = 10 ** math.floor(math.log10(x_max / 6))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= x_max / 6)
    for tick in np.arange(0, x_max, step):
        x, _ = to_px(float(tick), 0)
        draw.line([(x, height - bottom), (x, height - bottom + 4)], fill="black")
        draw.text((x, height - bottom + 6), f"{tick:g}", fill="black", font=font, anchor="mt")
    draw.line([(left, top), (left, height - bottom), (plot_right, height - bottom)], fill="black")
    draw.text(((left + plot_right) / 2, height - 24), "visual tokens per image", fill="black", font=font, anchor="mm")
    draw.text((left, 18), f"{title}   (y: {y_label})", fill="black", font=font, anchor="lm")
    same_x = {}
    for label, x, *_ in points:
        same_x.setdefault(x, []).append(label)
    for index, (label, x, y, interval) in enumerate(points):
        colour = FIGURE_COLOURS[index % len(FIGURE_COLOURS)]
        group = same_x[x]
        px, py = to_px(x, y)
        px += (group.index(label) - (len(group) - 1) / 2) * 7
        if interval is not None:
            low, high = to_px(x, interval[0])[1], to_px(x, interval[1])[1]
            draw.line([(px, low), (px, high)], fill=colour, width=2)
            for end in (low, high):
                draw.line([(px - 3, end), (px + 3, end)], fill=colour, width=2)
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        legend_y = top + 16 * index
        draw.ellipse([plot_right + 20, legend_y - 4, plot_right + 28, legend_y + 4], fill=colour)
        draw.text((plot_right + 34, legend_y), f"{label}: {100 * y:.1f}% at {x:g}", fill="black", font=font,
                  anchor="lm")
    return image


def write_reports(out_dir: Path, results: dict) -> None:
    write_json_atomically(out_dir / RESULTS_JSON, results)
    with atomic_file(out_dir / RESULTS_MD, overwrite=True, mode="w", encoding="utf-8") as stream:
        stream.write(markdown_report(results))
    summaries = [s for s in results["variants"] if s["answered"]]
    if results["recall_only"]:
        points = [(s["variant"], s["visual_tokens"], s["evidence_recall"] or 0.0, None) for s in summaries]
        figure, name = tradeoff_figure(points, "evidence recall", "evidence recall vs visual tokens"), RECALL_FIGURE
    else:
        points = [(s["variant"], s["visual_tokens"], s["accuracy"], s["ci95"]) for s in summaries]
        figure = tradeoff_figure(points, "exact-match accuracy, 95 % CI", "accuracy vs visual tokens")
        name = ACCURACY_FIGURE
    if points:
        with atomic_file(out_dir / name, overwrite=True) as stream:
            figure.save(stream, format="PNG")


# ---- towers and models -------------------------------------------------------------------------------------
def tower_features(tower, config, pixel_values, attention_layers=()):
    """Raw last-layer features [B, N, D] of a SigLIP tower, as `ShirgLavidaForDiffusionLM.vision_features`; with
    `attention_layers`, also {layer: received attention [B, N]} of those layers (`capture_received_attention`)."""
    from .modeling.selection_shirg import capture_received_attention

    pixel_values = pixel_values.to(dtype=tower.embeddings.patch_embedding.weight.dtype)
    interpolate = pixel_values.shape[-1] != config.vision_config.image_size
    with contextlib.ExitStack() as stack:
        seen = {layer: stack.enter_context(capture_received_attention(tower.encoder, layer))
                for layer in attention_layers}
        embeddings = tower.embeddings(pixel_values, interpolate_pos_encoding=interpolate)
        features = tower.encoder(inputs_embeds=embeddings).last_hidden_state
    return (features, {layer: captured["attention"] for layer, captured in seen.items()}) if attention_layers \
        else features


def tower_config(source: str):
    """The config of `--tower`: a preset name or a model folder."""
    from .modeling.configuration_shirg_lavida import ShirgLavidaConfig

    if source == "tiny":
        return ShirgLavidaConfig.tiny()
    if source == "lavida":
        return ShirgLavidaConfig.lavida_llada_8b()
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"--tower {source!r} is neither a model folder nor one of {', '.join(TOWER_PRESETS)}")
    return read_model_config(path)


def load_tower(source: str, config):
    """The SigLIP tower alone: seeded random for a preset, else the `vision_tower.*` weights of the folder."""
    import torch
    from safetensors import safe_open
    from transformers import SiglipVisionModel

    if source in TOWER_PRESETS:
        torch.manual_seed(TOWER_SEED)
        return SiglipVisionModel(config.vision_config).eval()
    tower = SiglipVisionModel(config.vision_config)
    prefix, state = "vision_tower.", {}
    for shard in sorted(Path(source).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as weights:
            state.update({key[len(prefix):]: weights.get_tensor(key) for key in weights.keys()
                          if key.startswith(prefix)})
    if not state:
        raise ValueError(f"--tower {source} holds no vision_tower.* weights in its *.safetensors files")
    tower.load_state_dict(state, strict=True)
    return tower.eval()


def load_model(model_dir: Path, adapter_dir: Path | None, config, dtype: str, device: str):
    """The model (with the LoRA adapter merged in, when given), in eval mode; `config` is the folder's, with any
    `--selection` settings."""
    from .modeling.modeling_shirg_lavida import ShirgLavidaForDiffusionLM

    model = ShirgLavidaForDiffusionLM.from_pretrained(model_dir, config=config, dtype=resolve_dtype(dtype))
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return model.to(device).eval()


def variant_request(variant: Variant) -> dict:
    """The processor call's settings for `variant` (they travel with the batch to `generate`)."""
    request = {"vision_mode": variant.vision_mode}
    if variant.method is not None:
        request.update(selection_method=variant.selector_method,
                       shirg_budget=ADAPTIVE_BUDGET if variant.adaptive else variant.budget)
    return request


# ---- the run -----------------------------------------------------------------------------------------------
def _check_positive(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"--{name} must be an integer >= 1, got {value!r}")


def load_questions(data_path: Path, split: str | None):
    """(dataset, split, fingerprint, ids) of a synth-schema data set, checked."""
    loaded, fingerprint = load_vqa_data(data_path)
    dataset, split = pick_split(loaded, split, data_path)
    dataset = with_answers(dataset)
    check_columns(dataset, f"--data {data_path}")
    missing = [column for column in SYNTH_COLUMNS if column not in dataset.column_names]
    if missing:
        raise ValueError(f"--data {data_path} lacks the column(s) {missing}; compare reads a `shirg-hf synth` set "
                         f"(the eval columns plus {', '.join(SYNTH_COLUMNS)})")
    check_images(dataset, data_path)
    return dataset, split, fingerprint, question_ids(dataset, data_path)


def _record(variant: Variant, qid, row: dict, mask: np.ndarray, kept, tokens: int) -> dict:
    return {
        "id": f"{variant.name}/{qid}", "variant": variant.name, "question_id": qid,
        "question_type": row["question_type"], "answer_glyphs": row["answer_glyphs"], "answers": row["answers"],
        "evidence_patches": int(mask.sum()), "recall": evidence_recall(variant, mask, kept), "visual_tokens": tokens,
    }


def _append(stream, records: list[dict]) -> None:
    for record in records:
        stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    stream.flush()
    os.fsync(stream.fileno())


def run_compare(
    data_path, variants: str, out_dir, model_dir=None, tower=None, recall_only: bool = False, adapter_dir=None,
    split: str | None = None, limit: int | None = None, batch_size: int = 8, max_new_tokens: int | None = None,
    block_length: int | None = None, step_ratio: float | None = None, dtype: str = "auto",
    device: str | None = None, overwrite: bool = False, progress: bool = True, decoding: str | None = None,
    threshold: float | None = None, factor: float | None = None, max_steps: int | None = None,
    selection: dict | None = None,
) -> dict:
    """Answer (or, with `recall_only`, select for) every question under every variant; write and return results.

    `selection`: settings that replace the model's `selection` ones for every variant (e.g. {"summary_weights":
    "attention"}); the model folder is not changed."""
    import torch
    from tqdm.auto import tqdm

    _check_positive("batch-size", batch_size)
    _check_positive("limit", limit)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    resolve_device(device)  # a bad --device fails before any work
    if recall_only and (model_dir is None) == (tower is None):
        raise ValueError(f"--recall-only needs one of --model DIR or --tower DIR-or-{'/'.join(TOWER_PRESETS)}")
    if not recall_only and tower is not None:
        raise ValueError("--tower only serves --recall-only (no LM); pass --model DIR to answer questions")
    if not recall_only and model_dir is None:
        raise ValueError("pass --model DIR (or --recall-only --tower DIR-or-preset for evidence recall alone)")
    if adapter_dir is not None and recall_only:
        raise ValueError("--adapter changes the projector only, which --recall-only does not use; leave it out")
    data_path, out_dir = Path(data_path).resolve(), Path(out_dir).resolve()
    model_dir = None if model_dir is None else Path(model_dir).resolve()
    adapter_dir = None if adapter_dir is None else Path(adapter_dir).resolve()
    if model_dir is not None:
        config = read_model_config(model_dir)
        source = {"model": str(model_dir), "model_fingerprint": model_fingerprint(model_dir)}
    else:
        config = tower_config(tower)
        source = {"tower": tower if tower in TOWER_PRESETS else str(Path(tower).resolve()),
                  "tower_fingerprint": None if tower in TOWER_PRESETS else model_fingerprint(Path(tower))}
    if adapter_dir is not None:
        from .export import check_adapter

        check_adapter(adapter_dir, config)
        adapter_files = sorted(path for path in adapter_dir.iterdir()
                               if path.is_file() and path.suffix in (".json", ".safetensors"))
        source.update(adapter=str(adapter_dir), adapter_fingerprint=sha256_of_files(adapter_files))
    if selection:
        for key in ("method", "budget"):
            if key in selection:
                raise ValueError(f"--selection {key}=...: the variants name the method and K; pass them there")
        config.selection = check_selection({**config.selection, **selection}, config.highres_grid)
    parsed = parse_variants(variants, config)
    generation_config = None
    if not recall_only:
        overrides = {name: value for name, value in (("max_new_tokens", max_new_tokens),
                                                     ("block_length", block_length), ("step_ratio", step_ratio),
                                                     ("decoding", decoding), ("threshold", threshold),
                                                     ("factor", factor), ("max_steps", max_steps))
                     if value is not None}
        generation_config = resolve_generation_config(model_dir, config, overrides)
    dataset, split, data_fingerprint, ids = load_questions(data_path, split)

    generation = None if generation_config is None else {
        key: value for key, value in generation_config.to_diff_dict().items() if key != "transformers_version"}
    run_config = json.loads(json.dumps({
        "command": "compare", "recall_only": recall_only, **source, "data": str(data_path), "split": split,
        "data_fingerprint": data_fingerprint, "variants": [v.name for v in parsed], "dtype": dtype,
        "generation": generation, **({"selection_overrides": selection} if selection else {}),
    }))  # runs without --selection keep the key out, so that their earlier folders still resume
    wanted = list(range(len(dataset) if limit is None else min(limit, len(dataset))))
    with exclusive_lock(out_dir):
        prepare_output(out_dir, run_config, overwrite)
        predictions_path = out_dir / PREDICTIONS_NAME
        answered = {record["id"] for record in read_predictions(predictions_path)}
        pending = {v.name: [row for row in wanted if f"{v.name}/{ids[row]}" not in answered] for v in parsed}
        todo = sorted({row for rows in pending.values() for row in rows})
        bad = find_bad_images(dataset, todo, data_path)
        if bad:
            raise ValueError(bad_images_message(bad, ids, data_path))
        if todo:
            device = resolve_device(device)
            with open(predictions_path, "a", encoding="utf-8") as stream:
                if recall_only:
                    _select_only(dataset, data_path, ids, parsed, pending, config, tower or str(model_dir), device,
                                 batch_size, stream, progress, len(wanted))
                else:
                    model = load_model(model_dir, adapter_dir, config, dtype, device)
                    for variant in parsed:
                        bar = tqdm(total=len(wanted), initial=len(wanted) - len(pending[variant.name]),
                                   desc=variant.name, unit="question", disable=not progress)
                        with bar:
                            _answer_variant(model, model_dir, config, generation_config, variant, dataset, data_path,
                                            ids, pending[variant.name], batch_size, device, stream, bar)
        wanted_ids = {ids[row] for row in wanted}
        records = [record for record in read_predictions(predictions_path) if record["question_id"] in wanted_ids]
        summaries = summarize(parsed, records, recall_only)
        results = {
            "recall_only": recall_only, "data": str(data_path), "num_questions": len(wanted),
            "threads": torch.get_num_threads(), "run_config": run_config,
            "complete": all(s["answered"] == len(wanted) for s in summaries), "variants": summaries,
        }
        write_reports(out_dir, results)
    return results


def _batch_inputs(dataset, data_path: Path, rows: list[int], config):
    """(rows as dicts, PIL images, evidence masks [B, N]) of a batch."""
    batch = dataset.select(rows).remove_columns(["image"])
    images = [load_image(source) for source in image_sources(dataset, rows, data_path)]
    masks = np.stack([evidence_mask(row["evidence_boxes"], image.size, config.highres_grid)
                      for row, image in zip(batch, images)])
    return list(batch), images, masks


def _answer_variant(model, model_dir, config, generation_config, variant, dataset, data_path, ids, rows, batch_size,
                    device, stream, bar) -> None:
    """Answer `rows` under `variant`, appending one record per question after every batch."""
    import torch

    from .demo import kv_cache_bytes
    from .processing.processing_shirg_lavida import build_prompt

    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    processor.selection = {**config.selection, "method": processor.selection["method"],
                           "budget": processor.selection["budget"]}  # with any --selection settings
    if variant.adaptive is not None:
        processor.selection = {**processor.selection, "adaptive_budget": list(variant.adaptive)}
    selector = VariantSelector(make_selector(variant, config)) if variant.method is not None else None
    swap = selector_swapped(model, selector) if selector is not None else contextlib.nullcontext()
    tokens_per_k = {}  # visual tokens per image K (one K unless adaptive)
    warmed_up = False
    with swap:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            batch, images, masks = _batch_inputs(dataset, data_path, chunk, config)
            if selector is not None and variant.method == ORACLE:
                selector.priority = torch.from_numpy(masks)

            def answer():
                if selector is not None:
                    selector.kept_calls = []
                inputs = processor(images=images, text=[build_prompt(row["question"]) for row in batch],
                                   return_tensors="pt", **variant_request(variant)).to(device)
                with torch.inference_mode():
                    output = model.generate(**inputs, generation_config=generation_config,
                                            return_dict_in_generate=True)
                return inputs, processor.batch_decode(output.sequences), output

            if not warmed_up:
                answer()
                warmed_up = True
            began = time.perf_counter()
            inputs, predictions, output = answer()
            passes, rates = output.num_forward_passes_per_row.tolist(), output.tokens_per_forward.tolist()
            seconds = (time.perf_counter() - began) / len(chunk)
            kept = None if selector is None else selector.kept_rows()
            budgets = inputs.get("shirg_budget") if variant.adaptive else None
            budgets = [budgets] * len(chunk) if isinstance(budgets, int) else budgets or [None] * len(chunk)
            prefix = inputs["attention_mask"].sum(-1).tolist()
            for k in set(budgets) - set(tokens_per_k):
                tokens_per_k[k] = visual_tokens(variant, config, k)
            records = []
            for index, (row_index, row, prediction) in enumerate(zip(chunk, batch, predictions)):
                record = _record(variant, ids[row_index], row, masks[index], None if kept is None else kept[index],
                                 tokens_per_k[budgets[index]])
                record.update(prediction=prediction.strip(), correct=exact_match(prediction, row["answers"]),
                              prefix_tokens=int(prefix[index]), seconds=seconds,
                              kv_cache_bytes=kv_cache_bytes(config, int(prefix[index]), model.dtype),
                              forward_passes=passes[index], tokens_per_forward=rates[index])
                records.append(record)
            _append(stream, records)
            bar.update(len(chunk))


def _select_only(dataset, data_path, ids, variants, pending, config, tower_source, device, batch_size, stream,
                 progress, total) -> None:
    """Recall of every selection variant from the tower's features; each image is encoded once."""
    import torch
    from tqdm.auto import tqdm

    from .processing.image_processing_shirg import ShirgImageProcessor

    tower = load_tower(tower_source, config).to(device)
    side = config.highres_image_size
    image_processor = ShirgImageProcessor(size={"height": side, "width": side})
    selectors = {v.name: make_selector(v, config) for v in variants if v.method is not None}
    layers = sorted({selector.attention_layer for selector in selectors.values() if selector.needs_attention()},
                    key=str)
    rows = sorted({row for chunk in pending.values() for row in chunk})
    bar = tqdm(total=total, initial=total - len(rows), desc="recall", unit="image", disable=not progress)
    with bar:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            batch, images, masks = _batch_inputs(dataset, data_path, chunk, config)
            features = None
            if selectors:
                pixels = image_processor(images, return_tensors="pt")["pixel_values"].to(device)
                with torch.inference_mode():
                    features, attentions = tower_features(tower, config, pixels, layers) if layers else \
                        (tower_features(tower, config, pixels), {})
            records = []
            for variant in variants:
                todo = set(pending[variant.name])
                selected = [index for index, row in enumerate(chunk) if row in todo]
                if not selected:
                    continue
                kept, budgets = None, [variant.budget] * len(selected)
                if variant.adaptive is not None:
                    budgets = [image_budget(variant, pixels[index].cpu().numpy(), config) for index in selected]
                if variant.name in selectors:
                    priority = torch.from_numpy(masks[selected]) if variant.method == ORACLE else None
                    selector = selectors[variant.name]
                    attention = attentions[selector.attention_layer][selected] if selector.needs_attention() \
                        else None
                    # one call per distinct K (each image's selection does not depend on the others)
                    kept = [None] * len(selected)
                    for k in sorted(set(budgets)):
                        same_k = [position for position, budget in enumerate(budgets) if budget == k]
                        output = selector(features[[selected[p] for p in same_k]], grid_size=config.highres_grid,
                                          budget=k, attentions=None if attention is None else attention[same_k],
                                          priority=None if priority is None else priority[same_k])
                        for position, indices in zip(same_k, output.kept_indices.cpu().numpy()):
                            kept[position] = indices
                for position, index in enumerate(selected):
                    records.append(_record(variant, ids[chunk[index]], batch[index], masks[index],
                                           None if kept is None else kept[position],
                                           visual_tokens(variant, config, budgets[position] if variant.adaptive
                                                         else None)))
            _append(stream, records)
            bar.update(len(chunk))


# ---- command line -------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="one model over the same questions for every vision mode / selector: accuracy, tokens, "
                        "KV cache, evidence recall, time (resumable)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--data", required=True, metavar="DIR", help="a `shirg-hf synth` folder")
    parser.add_argument("--variants", required=True,
                        help="comma-separated: lowres, full, METHOD:K (shirg, random, pooled, gradient, ...), oracle:K, "
                             "METHOD:KMIN-KMAX (adaptive K per image)")
    parser.add_argument("--out", required=True, metavar="DIR", help="results folder (resumed if it holds this run)")
    parser.add_argument("--model", metavar="DIR", help="save_pretrained folder with the processor")
    parser.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder, merged into --model")
    parser.add_argument("--recall-only", action="store_true", help="evidence recall only, no LM")
    parser.add_argument("--tower", metavar="DIR-or-preset",
                        help=f"with --recall-only: a model folder (tower weights only) or {'/'.join(TOWER_PRESETS)}")
    parser.add_argument("--split", help="split of a multi-split data set")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N questions")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, metavar="L", help="answer length (default: the model's)")
    parser.add_argument("--block-length", type=int, help="diffusion block length (default: the model's)")
    parser.add_argument("--step-ratio", type=float, help="denoising steps per block / block length")
    add_decoding_arguments(parser)
    add_device_arguments(parser)
    parser.add_argument("--selection", nargs="+", metavar="KEY=VALUE", default=[],
                        help="selection settings for every variant instead of the model's, VALUE as JSON "
                             "(summary_weights=attention, importance=attention_normalised, "
                             "coverage_cells=[2,2], weights=[0.1,0,0.9], ...)")
    parser.add_argument("--overwrite", action="store_true", help="discard the results in --out and start over")
    parser.set_defaults(func=run)


def parse_selection_overrides(entries: list[str]) -> dict:
    """["KEY=VALUE", ...] -> {KEY: VALUE}, VALUE read as JSON (a bare word is a string)."""
    overrides = {}
    for entry in entries:
        key, equals, text = entry.partition("=")
        if not equals or not key:
            raise ValueError(f"--selection {entry!r}: expected KEY=VALUE, e.g. summary_weights=attention")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


def run(args: argparse.Namespace) -> int:
    results = run_compare(
        args.data, args.variants, args.out, model_dir=args.model, tower=args.tower, recall_only=args.recall_only,
        adapter_dir=args.adapter, split=args.split, limit=args.limit, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, block_length=args.block_length, step_ratio=args.step_ratio,
        dtype=args.dtype, device=args.device, overwrite=args.overwrite, decoding=args.decoding,
        threshold=args.threshold, factor=args.factor, max_steps=args.max_steps,
        selection=parse_selection_overrides(args.selection),
    )
    print(markdown_report(results).split("\n\n")[1] if results["variants"] else "no variants")
    print(f"results in {Path(args.out).resolve()} ({'complete' if results['complete'] else 'partial'})")
    return 0
