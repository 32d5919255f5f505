"""Where the evidence model's detail answers fail (docs/EVIDENCE-RESULTS.md, run 14): accuracy by family and answer
length, by whether the answer's glyphs share a patch, and what the wrong glyphs are, from `shirg-hf compare` runs.

    python benchmarks/evidence_errors.py --data runs/evidence/data/test --runs shipped=runs/ev5/test/lora_a \
        --variants lowres,shirg:84

`--pair A,B` adds how often variant A answers a detail question right where B is wrong, and the other three cases
(the demo's selected image is a question where `shirg:84` is right and `lowres` wrong).

A multi-glyph answer "shares a patch" when two of its glyph centres fall in one patch of the grid named by
`--grid` (16: the high-res view's 8 px patches; 9: the native view's). A wrong glyph is "in the image" when the
image draws it elsewhere (a lookup error rather than a misread glyph).
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

from shirg_hf.compare import wilson_interval
from shirg_hf.evidence import make_example, patch_on_grid
from shirg_hf.synth import ANSWER_ALPHABET


def question_facts(data: Path, grid: int) -> dict:
    """{question id: (family, answer length, 'shared' / 'distinct' / 'single', glyphs drawn in the image)}."""
    import datasets

    config = json.loads((data / "synth_config.json").read_text())
    facts = {}
    for row in datasets.load_from_disk(str(data)).select_columns(["id", "family", "question_type"]):
        if row["question_type"] != "detail":
            continue
        split, seed, index = row["id"].split("-")
        example = make_example(split, int(seed), int(index), config["glyph_scale"])
        patches = [patch_on_grid(x, y, grid) for x, y in example.answer_centres]
        layout = "single" if len(patches) < 2 else "shared" if len(set(patches)) < len(patches) else "distinct"
        drawn = {ANSWER_ALPHABET[label] for _, _, label in example.glyph_centres}
        facts[row["id"]] = (row["family"], len(example.answer), layout, drawn)
    return facts


def cell(correct: list) -> str:
    low, high = wilson_interval(sum(correct), len(correct))
    return f"{100 * sum(correct) / len(correct):.1f} [{100 * low:.1f}, {100 * high:.1f}] (n {len(correct)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="the `shirg-hf synth` folder the runs answered")
    parser.add_argument("--runs", required=True, nargs="+", metavar="LABEL=FOLDER", help="compare folders")
    parser.add_argument("--variants", help="comma-separated variants (default: every variant of each run)")
    parser.add_argument("--grid", type=int, default=16, help="patch grid for 'shares a patch' (16 or 9)")
    parser.add_argument("--pair", metavar="A,B", help="two variants: how often each is right where the other is not")
    args = parser.parse_args()
    pair = args.pair.split(",") if args.pair else []
    if args.pair and len(pair) != 2:
        parser.error(f"--pair takes two variants, e.g. shirg:84,lowres; got {args.pair}")
    facts = question_facts(args.data, args.grid)
    wanted = set(args.variants.split(",")) if args.variants else None
    groups, errors = defaultdict(list), defaultdict(lambda: defaultdict(int))
    answered = defaultdict(dict)  # (run, question id) -> {variant: correct}
    for entry in args.runs:
        label, _, folder = entry.partition("=")
        for line in (Path(folder) / "predictions.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record["question_id"] not in facts or (wanted and record["variant"] not in wanted):
                continue
            family, length, layout, drawn = facts[record["question_id"]]
            answered[label, record["question_id"]][record["variant"]] = record["correct"]
            key = (label, record["variant"])
            groups[key + (f"{family}, {length} glyph(s)",)].append(record["correct"])
            groups[key + (f"multi-glyph, {layout} patch",)].append(record["correct"])
            truth, prediction = record["answers"][0], record["prediction"].strip()
            for position, glyph in enumerate(truth):
                guess = prediction[position] if position < len(prediction) else None
                kind = ("right" if guess == glyph else "missing" if guess is None
                        else "wrong, in the image" if guess in drawn else "wrong, not in the image")
                errors[key][kind] += 1
    print("| run | variant | detail questions | accuracy % [95 % CI] |\n|---|---|---|---|")
    for (label, variant, group), correct in sorted(groups.items()):
        if not group.startswith("multi-glyph, single"):
            print(f"| {label} | `{variant}` | {group} | {cell(correct)} |")
    print("\n| run | variant | answer glyphs | right % | wrong, in the image % | wrong, not in the image % | missing % |")
    print("|---|---|---|---|---|---|---|")
    for (label, variant), counts in sorted(errors.items()):
        total = sum(counts.values())
        shares = [100 * counts[k] / total for k in ("right", "wrong, in the image", "wrong, not in the image",
                                                     "missing")]
        print(f"| {label} | `{variant}` | {total} | " + " | ".join(f"{share:.1f}" for share in shares) + " |")
    if pair:
        answered_by = {variant for outcome in answered.values() for variant in outcome}
        if not set(pair) <= answered_by:
            parser.error(f"--pair {args.pair}: the runs (within --variants) answered {', '.join(sorted(answered_by))}")
        print_pairs(answered, *pair)


def print_pairs(answered: dict, first: str, second: str) -> None:
    """Detail questions by which of two variants answers them right, per run, with 95 % intervals."""
    cases = ((True, False, f"`{first}` right, `{second}` wrong"), (True, True, "both right"),
             (False, False, "both wrong"), (False, True, f"`{first}` wrong, `{second}` right"))
    by_run = defaultdict(list)
    for (label, _), outcome in answered.items():
        if first in outcome and second in outcome:
            by_run[label].append((outcome[first], outcome[second]))
    print("\n| run | " + " | ".join(name for _, _, name in cases) + " |\n|---|---|---|---|---|")
    for label, outcomes in sorted(by_run.items()):
        print(f"| {label} | " + " | ".join(cell([outcome == (a, b) for outcome in outcomes]) for a, b, _ in cases)
              + " |")


if __name__ == "__main__":
    main()
