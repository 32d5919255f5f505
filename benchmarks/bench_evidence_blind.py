"""The blind row of the evidence tables: the model answers every question of a `shirg-hf synth` set WITHOUT the
image (LaViDa's prompt with no `<image>`), so its accuracy is what answer priors and question wording give.

    python benchmarks/bench_evidence_blind.py --model shirg_hf/evidence_model --data data/test --out blind.json
"""

import argparse
import json
from pathlib import Path

import datasets
import torch

from shirg_hf.compare import accuracy_summary, exact_match, group_by
from shirg_hf.modeling.modeling_shirg_lavida import ShirgLavidaForDiffusionLM
from shirg_hf.processing.processing_shirg_lavida import ShirgLavidaProcessor, build_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="results JSON file")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = ShirgLavidaForDiffusionLM.from_pretrained(args.model).eval()
    processor = ShirgLavidaProcessor.from_pretrained(args.model)
    dataset = datasets.load_from_disk(args.data)  # a `shirg-hf synth` folder
    rows = list(dataset.remove_columns(["image"]))[: args.limit]
    records = []
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start:start + args.batch_size]
        inputs = processor(text=[build_prompt(row["question"], with_image=False) for row in chunk],
                           return_tensors="pt")
        with torch.inference_mode():
            answers = processor.batch_decode(model.generate(**inputs))
        records += [{"correct": exact_match(answer, row["answers"]), "question_type": row["question_type"],
                     "answer_glyphs": row["answer_glyphs"], "prediction": answer.strip()}
                    for answer, row in zip(answers, chunk)]
    results = {"variant": "blind", "visual_tokens": 0, **accuracy_summary(records),
               "by_question_type": {k: accuracy_summary(v) for k, v in group_by(records, "question_type").items()},
               "by_answer_glyphs": {k: accuracy_summary(v) for k, v in group_by(records, "answer_glyphs").items()}}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: results[k] for k in ("accuracy", "ci95", "n")}))


if __name__ == "__main__":
    main()
