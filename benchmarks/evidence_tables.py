"""The evidence tables (BENCHMARKS.md, docs/EVIDENCE-RESULTS.md) from `shirg-hf compare` runs and the blind row.

    python benchmarks/evidence_tables.py --lora runs/evidence/cmp_lora --zero-shot runs/evidence/cmp_zero \
        --blind runs/evidence/blind.json --gate0 runs/evidence/cmp_g0 > runs/evidence/tables.md
    python benchmarks/evidence_tables.py --selectors 56=runs/cmp_56 84=runs/cmp_84 112=runs/cmp_112

Accuracy is exact match with a 95 % Wilson interval; `fine` = detail + reverse questions (the answer needs the
fine glyphs); gates and the main claim follow ../shared/EVIDENCE.md.
"""

import argparse
import json
from pathlib import Path

from shirg_hf.compare import paired_difference, wilson_interval

NUM_LAYERS_KEY = "num_hidden_layers"


def load(folder: Path) -> tuple[dict, dict]:
    results = json.loads((folder / "results.json").read_text())
    records = {}
    for line in (folder / "predictions.jsonl").read_text().splitlines():
        record = json.loads(line)
        records.setdefault(record["variant"], []).append(record)
    return {s["variant"]: s for s in results["variants"]}, records


def acc(records, keep=lambda r: True) -> tuple[float, float, float, int]:
    chosen = [r for r in records if keep(r)]
    correct = sum(bool(r["correct"]) for r in chosen)
    low, high = wilson_interval(correct, len(chosen))
    return (correct / len(chosen) if chosen else float("nan")), low, high, len(chosen)


def cell(value) -> str:
    p, low, high, n = value
    return f"{100 * p:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


TYPES = ("detail", "reverse", "global", "spatial")
ABLATION_HEADER = ("| variant | adapter | visual tokens | evidence recall % | all % | "
                   + " | ".join(f"{t} %" for t in TYPES) + " |")
ABLATION_RULE = "|---|---|---|---|---|" + "---|" * len(TYPES)


def ablation_row(label: str, adapter: str, summary: dict | None, rs: list[dict]) -> str:
    recall = summary.get("evidence_recall") if summary else None
    tokens = summary["visual_tokens"] if summary else 0
    cells = [cell(acc(rs, lambda r, t=t: r["question_type"] == t)) for t in TYPES]
    return (f"| {label} | {adapter} | {tokens:.0f} | {'-' if recall is None else f'{100 * recall:.1f}'} | "
            f"{cell(acc(rs))} | " + " | ".join(cells) + " |")


def control_rows(entries: list[str]) -> list[str]:
    """Ablation rows of other stage-2 runs, `ADAPTER=FOLDER` each."""
    rows = []
    for entry in entries:
        adapter, _, folder = entry.rpartition("=")
        summaries, records = load(Path(folder))
        rows += [ablation_row(f"`{name}`", adapter, summaries[name], records[name]) for name in summaries]
    return rows


FINE = lambda r: r["question_type"] in ("detail", "reverse")  # noqa: E731
DETAIL = lambda r: r["question_type"] == "detail"  # noqa: E731
DETAIL2 = lambda r: r["question_type"] == "detail" and int(r["answer_glyphs"]) == 2  # noqa: E731


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lora", type=Path, nargs="+", default=[],
                        help="compare folder(s) of the shipped (merged) model, variants merged in order")
    parser.add_argument("--zero-shot", type=Path, help="compare folder of the stage-1 model (no adapter)")
    parser.add_argument("--blind", type=Path, help="bench_evidence_blind.py output")
    parser.add_argument("--gate0", type=Path, help="compare folder: stage-1 model, lowres, large-glyph val set")
    parser.add_argument("--layers", type=int, default=3, help="LM layers (KV cache per layer)")
    parser.add_argument("--controls", nargs="+", metavar="ADAPTER=FOLDER", default=[],
                        help="compare folders of other stage-2 runs (LM-LoRA, full projector, per-K, rank 2r): "
                             "ablation rows with ADAPTER as their adapter")
    parser.add_argument("--selectors", nargs="+", metavar="K=FOLDER", default=[],
                        help="compare folders of the default and every baseline at budget K (issue 15's "
                             "requirement 4): paired differences and the verdict")
    parser.add_argument("--decoding", nargs="+", metavar="LABEL=FOLDER", default=[],
                        help="compare folders of one variant under other decoding settings (issue 16's curve)")
    args = parser.parse_args()
    if not args.lora:
        if not args.selectors and not args.controls:
            parser.error("pass --lora FOLDER ... (the main tables), or --controls / --selectors alone")
        if args.controls:
            print("\n".join(["### Stage-2 controls (test split)", "", ABLATION_HEADER, ABLATION_RULE,
                             *control_rows(args.controls)]))
        if args.selectors:
            print(selector_table(args.selectors))
        return
    summaries, records = {}, {}
    for folder in args.lora:
        folder_summaries, folder_records = load(folder)
        summaries.update(folder_summaries)
        records.update(folder_records)
    zero_summaries, zero_records = load(args.zero_shot) if args.zero_shot else ({}, {})
    out = []
    base = summaries["lowres"]["seconds_per_answer"]

    out += ["### Expected performance (the research plan's table at CPU scale; shared LoRA, test split)", "",
            "| view | visual tokens | prefix tokens | KV cache per layer / all (KiB) | s / answer vs native | "
            "accuracy % [95 % CI] | fine (detail + reverse) % | detail % | needs training |",
            "|---|---|---|---|---|---|---|---|---|"]
    rows = [("native view 72 px (`lowres`)", "lowres", "no (stage-1 model)"),
            ("SHIRG K = 56 (`shirg:56`)", "shirg:56", "projector LoRA"),
            ("SHIRG K = 84 (`shirg:84`)", "shirg:84", "projector LoRA"),
            ("SHIRG K = 112 (`shirg:112`)", "shirg:112", "projector LoRA"),
            ("all 256 high-res tokens (`full`)", "full", "projector LoRA")]
    for label, name, training in rows:
        s, r = summaries[name], records[name]
        kv = s["kv_cache_bytes"] / 1024
        out.append(f"| {label} | {s['visual_tokens']:.0f} | {s['prefix_tokens']:.1f} | {kv / args.layers:.1f} / "
                   f"{kv:.1f} | {s['seconds_per_answer'] / base:.2f}x | {cell(acc(r))} | {cell(acc(r, FINE))} | "
                   f"{cell(acc(r, DETAIL))} | {training} |")

    types = TYPES
    out += ["", "### Ablations (test split; K = 84 unless named; LoRA = the shipped shared adapter)", "",
            ABLATION_HEADER, ABLATION_RULE]
    for name in summaries:
        out.append(ablation_row(f"`{name}`", "LoRA", summaries[name], records[name]))
    for name in zero_summaries:
        out.append(ablation_row(f"`{name}`", "none (zero-shot)", zero_summaries[name], zero_records[name]))
    out += control_rows(args.controls)
    if args.blind:
        blind = json.loads(args.blind.read_text())
        cells = []
        for t in types:
            entry = blind["by_question_type"].get(t)
            cells.append("-" if entry is None else
                         f"{100 * entry['accuracy']:.1f} [{100 * entry['ci95'][0]:.1f}, {100 * entry['ci95'][1]:.1f}]")
        out.append(f"| blind (no image) | LoRA | 0 | - | {100 * blind['accuracy']:.1f} [{100 * blind['ci95'][0]:.1f}, "
                   f"{100 * blind['ci95'][1]:.1f}] | " + " | ".join(cells) + " |")

    lengths = sorted({str(r["answer_glyphs"]) for rs in records.values() for r in rs})
    out += ["", "### Accuracy % [95 % CI] per answer length (fine glyphs the answer needs), shared LoRA", "",
            "| variant | " + " | ".join(f"{n} glyph(s)" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for name, rs in records.items():
        out.append(f"| `{name}` | " + " | ".join(
            cell(acc(rs, lambda r, n=n: str(r["answer_glyphs"]) == n)) for n in lengths) + " |")

    out += ["", "### Gates and the main claim", ""]
    if args.gate0:
        _, g0_records = load(args.gate0)
        g0 = acc(g0_records["lowres"], DETAIL)
        out.append(f"- **G0** (stage 1 reads large glyphs at the native side: detail >= 90 %, val split, glyph scale "
                   f"1.6): {cell(g0)} (n {g0[3]}) -> **{'met' if g0[0] >= 0.9 else 'not met'}**")
    native_zero = zero_records.get("lowres")
    native = records["lowres"]
    g1_source = native_zero or native
    g1 = acc(g1_source, DETAIL2)
    out.append(f"- **G1** (native view <= 20 % on 2-glyph detail questions{', no adapter' if native_zero else ''}): "
               f"{cell(g1)} (n {g1[3]}) -> **{'met' if g1[0] <= 0.2 else 'not met'}**; with the LoRA "
               f"{cell(acc(native, DETAIL2))}")
    full_d, native_d = acc(records["full"], DETAIL), acc(native, DETAIL)
    out.append(f"- **G2** (all high-res tokens + LoRA >= native + 30 points on detail): {cell(full_d)} vs "
               f"{cell(native_d)}, +{100 * (full_d[0] - native_d[0]):.1f} points -> "
               f"**{'met' if full_d[0] - native_d[0] >= 0.3 else 'not met'}**")
    if args.blind:
        blind = json.loads(args.blind.read_text())
        detail = blind["by_question_type"].get("detail", {"accuracy": float("nan"), "ci95": [0, 0]})
        out.append(f"- **G3** (blind ~ chance on detail: one glyph of 24 is 4.2 %, two 0.2 %): blind detail "
                   f"{100 * detail['accuracy']:.1f} [{100 * detail['ci95'][0]:.1f}, {100 * detail['ci95'][1]:.1f}] "
                   f"-> **{'met' if detail['ci95'][0] <= 0.042 + 0.03 else 'not met'}**")
    shirg = acc(records["shirg:84"], DETAIL)
    checks = [("native view", native_d, 0.30, ">")]
    for other in ("random:84", "pooled:84"):
        if other in records:
            checks.append((other, acc(records[other], DETAIL), 0.15, ">"))
    for other in ("full", "oracle:84"):
        if other in records:
            checks.append((other, acc(records[other], DETAIL), -0.05, "within"))
    parts, ok = [], True
    for label, value, margin, kind in checks:
        gap = shirg[0] - value[0]
        good = gap > margin if kind == ">" else gap >= margin
        ok &= good
        parts.append(f"vs {label} {100 * value[0]:.1f}: {gap * 100:+.1f} points "
                     f"({'needs > +' + str(int(margin * 100)) if kind == '>' else 'needs >= -5'}: "
                     f"{'yes' if good else 'no'})")
    out.append(f"- **Main claim** (SHIRG K = 84 on detail questions, {100 * shirg[0]:.1f} %): " + "; ".join(parts)
               + f" -> **{'met' if ok else 'not met'}**")
    for other in ("gradient:84", "importance:84"):
        if other in records:
            value = acc(records[other], DETAIL)
            out.append(f"- SHIRG vs `{other}` on detail: {100 * shirg[0]:.1f} vs {100 * value[0]:.1f} "
                       f"({100 * (shirg[0] - value[0]):+.1f} points)")
    if args.decoding:
        out += ["", decoding_table(args.decoding, records, summaries)]
    if args.selectors:
        out += ["", selector_table(args.selectors)]
    print("\n".join(out))


BASELINES = ("gradient", "importance", "magnitude", "no_coverage", "random", "pooled")  # issue 15, requirement 4
ALSO_SHOWN = ("shirg_seed", "no_summary", "oracle")
NO_RECALL = ("pooled",)  # region means cover every patch: recall 100 % by construction


def _difference(value: dict) -> str:
    low, high = value["ci95"]
    return f"{100 * value['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def selector_table(entries: list[str], default: str = "shirg") -> str:
    """Issue 15's requirement 4 per K: each selector's recall and accuracy, the default minus it paired on the
    same questions (95 % interval), and the verdict: accuracy met when no baseline is significantly better
    (every interval's upper end >= 0) and the default is significantly above random and pooled (lower end > 0);
    recall met when the default's mean recall is the highest (pooled excluded: its recall is 100 % by
    construction)."""
    lines = ["### The default against every baseline, paired on the same test questions (issue 15, requirement 4)",
             "", "| K | selector | recall % | all % | detail % | default - selector: recall (points) | all | detail |",
             "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for entry in entries:
        budget, _, folder = entry.partition("=")
        summaries, records = load(Path(folder))
        ref = records[f"{default}:{budget}"]
        ref_detail = [r for r in ref if DETAIL(r)]
        short_all, short_detail, short_recall, not_above = [], [], [], []
        for name in (default, *BASELINES, *ALSO_SHOWN):
            variant = f"{name}:{budget}"
            if variant not in records:
                continue
            rs, summary = records[variant], summaries[variant]
            cells = [f"{100 * summary['evidence_recall']:.1f}", cell(acc(rs)), cell(acc(rs, DETAIL))]
            if name == default:
                lines.append(f"| {budget} | `{variant}` (default) | " + " | ".join(cells) + " | - | - | - |")
                continue
            recall = None if name in NO_RECALL else paired_difference(ref, rs, "recall")
            overall = paired_difference(ref, rs)
            detail = paired_difference(ref_detail, [r for r in rs if DETAIL(r)])
            lines.append(f"| {budget} | `{variant}` | " + " | ".join(cells) + " | "
                         + ("-" if recall is None else _difference(recall)) + f" | {_difference(overall)} | "
                         + f"{_difference(detail)} |")
            if name not in BASELINES:
                continue
            if overall["ci95"][1] < 0:
                short_all.append(name)
            if detail["ci95"][1] < 0:
                short_detail.append(name)
            if recall is not None and recall["difference"] < 0:
                short_recall.append(f"{name} ({100 * recall['difference']:+.1f}"
                                    + (", significant" if recall["ci95"][1] < 0 else "") + ")")
            if name in ("random", "pooled") and overall["ci95"][0] <= 0:
                not_above.append(name)
        accuracy_met = not short_all and not not_above
        better = f"significantly better on all questions: {', '.join(short_all)}" if short_all else \
            "no baseline significantly better on all questions"
        below = f"not significantly below it: {', '.join(not_above)}" if not_above else \
            "random and pooled significantly below it"
        detail_note = f"on detail questions significantly better: {', '.join(short_detail)}" if short_detail else \
            "no baseline significantly better on detail questions"
        recall_note = f"higher mean recall: {', '.join(short_recall)}" if short_recall else "the highest mean recall"
        verdicts.append(f"- K = {budget}: accuracy **{'met' if accuracy_met else 'not met'}** ({better}; {below}; "
                        f"{detail_note}); recall **{'not met' if short_recall else 'met'}** ({recall_note})")
    return "\n".join(lines + ["", *verdicts])


def decoding_table(entries: list[str], records: dict, summaries: dict, variant: str = "shirg:84") -> str:
    """Accuracy against forward passes per answer for one variant under several decoding settings; the first
    row is the variant as run in the main table (the model's default schedule)."""
    rows = [("default schedule (model's generation config)", summaries[variant], records[variant])]
    for entry in entries:
        label, _, folder = entry.rpartition("=")
        folder_summaries, folder_records = load(Path(folder))
        rows.append((label, folder_summaries[variant], folder_records[variant]))
    base = rows[0][1]["forward_passes_per_answer"]
    lines = [f"### Accuracy against forward passes (`{variant}`, shared LoRA, test split)", "",
             "| decoding | forward passes / answer | vs default | tokens / forward | accuracy % [95 % CI] | detail % |",
             "|---|---|---|---|---|---|"]
    for label, summary, record in rows:
        passes = summary["forward_passes_per_answer"]
        lines.append(f"| {label} | {passes:.2f} | {passes / base:.2f}x | {summary['tokens_per_forward']:.2f} | "
                     f"{cell(acc(record))} | {cell(acc(record, DETAIL))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
