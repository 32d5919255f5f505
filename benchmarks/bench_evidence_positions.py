"""How much the evidence model's reading depends on where the text sits relative to the image: detail accuracy
when the rotary positions of the text after the image block are moved on by a gap (no token is added or removed;
gap 0 is the normal prompt), per view.

    python benchmarks/bench_evidence_positions.py --model shirg_hf/evidence_model --data data/val --limit 300 \
        --variants lowres,full,shirg:56,shirg:84,shirg:112 --gaps=-8,-2,0,2,8,32

Decoding is the evidence model's own (greedy, one token per step, the most confident masked position first),
written out with full forwards under the prefix-DLM mask so that positions can be given; the `generate` column
is the package's cached sampler on the same questions, and `same` the share of questions where its answer equals
gap 0's (100 up to float ties).
"""

import argparse

import datasets
import numpy as np
import torch

from shirg_hf.compare import exact_match
from shirg_hf.evidence import ANSWER_TOKENS, shifted_positions
from shirg_hf.modeling.modeling_shirg_lavida import ShirgLavidaForDiffusionLM
from shirg_hf.processing.processing_shirg_lavida import ShirgLavidaProcessor, build_prompt


@torch.inference_mode()
def greedy_answer(model, inputs: dict, gap: int) -> torch.Tensor:
    """[ANSWER_TOKENS] ids, one masked position written per forward, the text after the image moved on by `gap`."""
    mask_id = model.config.text_config.mask_token_id
    prompt = inputs["input_ids"]  # [1, P]
    answer = torch.full((1, ANSWER_TOKENS), mask_id)  # [1, L]
    input_ids = torch.cat([prompt, answer], dim=1)  # [1, P + L]
    embeds, _ = model.embed_multimodal(input_ids, inputs["pixel_values"], shirg_budget=inputs.get("shirg_budget"),
                                       vision_mode=inputs["vision_mode"])  # [1, P + L, H]: the tower runs once
    positions = shifted_positions(input_ids, model.config.image_token_id, torch.tensor([gap]))  # [1, P + L]
    for _ in range(ANSWER_TOKENS):
        logits = model(inputs_embeds=embeds, prefix_lengths=torch.tensor([prompt.shape[1]]),
                       position_ids=positions).logits[0, prompt.shape[1]:]  # [L, V]
        confidence, proposal = logits.double().softmax(-1).max(-1)  # [L]
        confidence = confidence.masked_fill(answer[0] != mask_id, -1.0)
        position = int(confidence.argmax())
        answer[0, position] = proposal[position]
        embeds[0, prompt.shape[1] + position] = model.get_input_embeddings()(proposal[position])
    return answer[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="a `shirg-hf synth` folder (val split for diagnostics)")
    parser.add_argument("--limit", type=int, default=300, help="first N questions; detail questions are scored")
    parser.add_argument("--variants", default="lowres,full,shirg:84")
    parser.add_argument("--gaps", default="-8,-2,0,2,8,32")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = ShirgLavidaForDiffusionLM.from_pretrained(args.model).eval()
    processor = ShirgLavidaProcessor.from_pretrained(args.model)
    rows = [row for row in datasets.load_from_disk(args.data).select(range(args.limit))
            if row["question_type"] == "detail"]
    gaps = [int(gap) for gap in args.gaps.split(",")]
    print(f"{len(rows)} detail questions of the first {args.limit} in {args.data}; {args.threads} thread(s)")
    print("| view | generate | same | " + " | ".join(f"gap {gap:+d}" for gap in gaps) + " |")
    print("|---|---|---|" + "---|" * len(gaps))
    for variant in args.variants.split(","):
        mode, _, budget = variant.partition(":")
        kwargs = {"shirg_budget": int(budget)} if budget else {}
        correct, same = {gap: [] for gap in ["generate", *gaps]}, []
        for row in rows:
            inputs = processor(images=[row["image"]], text=[build_prompt(row["question"])], vision_mode=mode,
                               return_tensors="pt", **kwargs)
            with torch.inference_mode():
                generated = processor.batch_decode(model.generate(**inputs))[0]
            correct["generate"].append(exact_match(generated, row["answers"]))
            for gap in gaps:
                answer = processor.batch_decode(greedy_answer(model, inputs, gap)[None])[0]
                correct[gap].append(exact_match(answer, row["answers"]))
                if gap == 0:
                    same.append(answer == generated)
        cells = [f"{100 * np.mean(values):.1f}" for values in correct.values()]
        cells.insert(1, f"{100 * np.mean(same):.1f}" if same else "-")
        print(f"| {variant} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
