"""Evaluate a SHIRG-LaViDa model on a VQA set with the `evaluate` metrics, in plain Python.

    python examples/evaluate_vqa.py --model ./shirg-lavida-8b --data ./docvqa_val --metric anls --budget 768

--data is a `datasets` folder (`save_to_disk`) with columns image, question, answers (list of gold strings).
The `shirg-hf eval` command does the same with resumable JSONL output; this script shows the API.
"""

import argparse

import datasets
import torch
from transformers import AutoModel, AutoProcessor

from shirg_hf import metrics


def evaluate_vqa(model, processor, rows, metric_name: str, budget: int | None = None, batch_size: int = 4,
                 **generate_kwargs) -> dict:
    """Answer every row and score the answers; returns the metric dict and the predictions."""
    metric = metrics.load(metric_name)
    budget_kwargs = {"shirg_budget": budget} if budget is not None else {}
    predictions = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]  # a dict of columns
        inputs = processor(images=batch["image"], text=[processor.build_prompt(q) for q in batch["question"]],
                           return_tensors="pt", **budget_kwargs)
        with torch.inference_mode():
            answer_ids = model.generate(**inputs, **generate_kwargs)  # the inputs carry the budget K
        predictions += [answer.strip() for answer in processor.batch_decode(answer_ids)]
    scores = metric.compute(predictions=predictions, references=list(rows["answers"]))
    return {"scores": scores, "predictions": predictions}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder or Hub repo id")
    parser.add_argument("--data", required=True, help="datasets folder with image, question, answers")
    parser.add_argument("--metric", choices=sorted(metrics.METRICS), required=True)
    parser.add_argument("--budget", type=int, help="SHIRG budget K (default: the model's)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    model = AutoModel.from_pretrained(args.model, dtype="auto").eval()
    processor = AutoProcessor.from_pretrained(args.model)
    rows = datasets.load_from_disk(args.data)
    result = evaluate_vqa(model, processor, rows, args.metric, args.budget, max_new_tokens=args.max_new_tokens,
                          block_length=args.max_new_tokens, step_ratio=0.5)
    print(result["scores"])
    return result


if __name__ == "__main__":
    main()
