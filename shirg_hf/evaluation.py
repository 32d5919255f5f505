"""`shirg-hf eval`: answer a VQA set with a saved model and score it (ANLS, relaxed accuracy or VQA accuracy).

The data set follows the schema of `shirg_hf.data`, shared with `shirg-hf train` (image, question, answers, and
optionally id, else the row index is the id). Everything (columns, answers, ids, budget, generation settings) is
checked before the model is loaded.

`--out` receives `run_config.json` (what was evaluated and how), `predictions.jsonl` (one line per answered
question, appended and flushed after every batch, so an interruption loses at most the batch in flight) and
`metrics.json` (written atomically at the end, over every answered question). Running again with the same
`--out` and the same settings resumes: questions already answered are skipped. Other settings are refused
unless `--overwrite`, which starts over; earlier results are never replaced silently.

Every image still to answer is read (with the loader of `generate`, EXIF orientation applied) before the model
is loaded: an unreadable one stops the run with the list of bad rows, or, with `--on-bad-image skip`, is
recorded in `predictions.jsonl` as failed (`"error"`: the reason; no score) and left out of the metric.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .data import (
    check_columns,
    check_images,
    image_files_fingerprint,
    image_sources,
    load_vqa_data,
    pick_split,
    question_ids,
    sha256_of_files,
    with_answers,
)
from .devices import DTYPES, add_device_arguments, resolve_device, resolve_dtype
from .fileio import atomic_folder, exclusive_lock, write_json_atomically
from .metrics import METRICS, get_metric
from .processing.image_processing_shirg import load_image
from .validation import check_model_files

RUN_CONFIG_NAME = "run_config.json"
PREDICTIONS_NAME = "predictions.jsonl"
METRICS_NAME = "metrics.json"
BAD_IMAGE_POLICIES = ("error", "skip")


# ---- scores (the registry in `shirg_hf.metrics`; the aggregate comes from the evaluate metric itself) ----------
def question_score(metric: str, prediction: str, gold_answers: list[str]) -> float:
    """The score of one answer under `metric`; the metric's `compute` is the mean of these."""
    return get_metric(metric).score(prediction, gold_answers)


def compute_metrics(metric: str, records: list[dict]) -> dict:
    """`{metric key: value}` of the registered metric over answered `records`."""
    return get_metric(metric).module().compute(predictions=[record["prediction"] for record in records],
                                               references=[record["answers"] for record in records])


# ---- data ----------------------------------------------------------------------------------------------------
def find_bad_images(dataset, rows: list[int], data_path: Path) -> dict:
    """{row: reason} for the rows whose image cannot be loaded (missing, truncated, not an image, too large)."""
    bad = {}
    for start in range(0, len(rows), 256):
        chunk = rows[start : start + 256]
        for row, source in zip(chunk, image_sources(dataset, chunk, data_path)):
            try:
                load_image(source)
            except (ValueError, FileNotFoundError) as error:
                bad[row] = str(error)
    return bad


def bad_images_message(bad: dict, ids: list, data_path: Path) -> str:
    """One line naming the rows with unreadable images and the two ways forward."""
    examples = "; ".join(f"id {ids[row]!r}: {reason}" for row, reason in list(bad.items())[:3])
    more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
    return (f"--data {data_path}: {len(bad)} image(s) cannot be read: {examples}{more}. Fix or remove those rows, "
            "or pass --on-bad-image skip to record them as failed and evaluate the rest")


def check_answers(dataset, metric: str, path: Path) -> None:
    """Dry-run the metric's own input checks on the gold answers (e.g. VQA accuracy needs >= 2 answers per question)."""
    references = dataset.select_columns(["answers"])["answers"]
    try:
        compute_metrics(metric, [{"prediction": "", "answers": answers} for answers in references])
    except ValueError as error:
        raise ValueError(f"--data {path}: the answers do not suit --metric {metric}: {error}") from None


# ---- model ---------------------------------------------------------------------------------------------------
def read_model_config(model_dir: Path):
    """The model's config, after checking the folder holds a ShirgLavida model and its processor."""
    from .modeling.configuration_shirg_lavida import ShirgLavidaConfig

    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {model_dir} is not a folder; pass a save_pretrained folder")
    for name in ("config.json", "processor_config.json"):
        if not (model_dir / name).is_file():
            raise ValueError(f"--model {model_dir} has no {name}; pass a folder holding the model and its processor "
                             "(model.save_pretrained + processor.save_pretrained, or `shirg-hf export --merge`)")
    check_model_files(model_dir)
    model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type != ShirgLavidaConfig.model_type:
        raise ValueError(f"--model {model_dir} holds a {model_type!r} model; eval takes a "
                         f"{ShirgLavidaConfig.model_type!r} model")
    return ShirgLavidaConfig.from_pretrained(model_dir)


def check_budget(config, budget: int | None) -> None:
    """Raise ValueError unless `budget` is None or a budget K this model's selecting vision mode takes."""
    if budget is None:
        return
    try:
        config.num_image_tokens(budget=budget)
    except ValueError as error:
        raise ValueError(f"--budget {budget} does not fit this model: {error}") from None


def resolve_generation_config(model_dir: Path, config, overrides: dict):
    """The model's saved generation settings with `overrides` applied, validated."""
    from transformers import GenerationConfig

    from .modeling.generation_diffusion import DiffusionGenerationConfig

    if (model_dir / "generation_config.json").is_file():
        saved = GenerationConfig.from_pretrained(model_dir)
    else:
        saved = DiffusionGenerationConfig.from_model_config(config)
    generation_config = DiffusionGenerationConfig.from_generation_config(saved, **overrides)
    generation_config.validate()
    return generation_config


MODEL_FILE_SUFFIXES = (".json", ".jinja", ".safetensors", ".model", ".txt")


def model_fingerprint(model_dir: Path) -> str:
    """SHA-256 of the contents of the model's files: configs, processor and tokenizer files, and weights."""
    files = sorted(path for path in model_dir.iterdir() if path.is_file() and path.suffix in MODEL_FILE_SUFFIXES)
    return sha256_of_files(files)


# ---- output folder -------------------------------------------------------------------------------------------
def settings_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """"key: old before, new now" for every setting that differs (nested settings as `outer.inner`)."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += settings_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            differences.append(f"{prefix}{key}: {old!r} before, {new!r} now")
    return differences


def prepare_output(out_dir: Path, run_config: dict, overwrite: bool) -> None:
    """Create `out_dir` for this run, or check that it holds an earlier run with the same settings (resume)."""
    existing = out_dir / RUN_CONFIG_NAME
    if out_dir.exists() and not overwrite:
        if not out_dir.is_dir():
            raise FileExistsError(f"--out {out_dir} exists and is not a folder")
        if existing.is_file():
            differences = settings_differences(json.loads(existing.read_text(encoding="utf-8")), run_config)
            if differences:
                raise FileExistsError(
                    f"--out {out_dir} holds results of a run with other settings ({'; '.join(differences)}). "
                    "Use another --out, or pass --overwrite to discard them and start over."
                )
            return
        if any(out_dir.iterdir()):
            raise FileExistsError(f"--out {out_dir} exists and is not a shirg-hf eval folder (no {RUN_CONFIG_NAME}); "
                                  "choose another --out or pass --overwrite to replace it")
    with atomic_folder(out_dir, overwrite=overwrite) as staging:
        write_json_atomically(staging / RUN_CONFIG_NAME, run_config)
        (staging / PREDICTIONS_NAME).touch()


def read_predictions(path: Path) -> list[dict]:
    """The answered questions in `predictions.jsonl`.

    Only the last line may be cut off (an interruption while it was written); it is removed. Any other broken
    line, or an id answered twice, is an error: the file was edited and resuming could mix results.
    """
    if not path.is_file():
        return []
    lines = path.read_bytes().splitlines(keepends=True)
    records, valid_bytes = [], 0
    for number, line in enumerate(lines, start=1):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no line end")
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                os.truncate(path, valid_bytes)
                break
            raise ValueError(f"{path} line {number} is not a JSON record; fix the file, or pass --overwrite to "
                             "start over") from None
        valid_bytes += len(line)
    ids = [record["id"] for record in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path} answers some ids more than once; fix the file, or pass --overwrite to start over")
    return records


# ---- the run -------------------------------------------------------------------------------------------------
def run_eval(
    model_dir,
    data_path,
    metric: str,
    out_dir,
    budget: int | None = None,
    split: str | None = None,
    max_new_tokens: int | None = None,
    block_length: int | None = None,
    step_ratio: float | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    dtype: str = "auto",
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_bad_image: str = "error",
    decoding: str | None = None,
    threshold: float | None = None,
    factor: float | None = None,
    max_steps: int | None = None,
) -> dict:
    """Answer (the first `limit` of) the questions not answered yet in `out_dir`, then write and return the metrics.

    Images of the questions to answer are all read before the model is loaded. `on_bad_image="error"` stops with
    a list of the unreadable ones; `"skip"` records each as a failed question (with the reason, no score) and
    answers the rest.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoProcessor

    from .modeling.modeling_shirg_lavida import ShirgLavidaForDiffusionLM
    from .processing.processing_shirg_lavida import build_prompt

    model_dir, data_path, out_dir = Path(model_dir).resolve(), Path(data_path).resolve(), Path(out_dir).resolve()
    get_metric(metric)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit must be an integer >= 1, got {limit!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    resolve_device(device)  # a bad --device fails before any work
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"--on-bad-image {on_bad_image!r} is not one of {', '.join(BAD_IMAGE_POLICIES)}")
    config = read_model_config(model_dir)
    check_budget(config, budget)
    overrides = {name: value for name, value in
                 (("max_new_tokens", max_new_tokens), ("block_length", block_length), ("step_ratio", step_ratio),
                  ("decoding", decoding), ("threshold", threshold), ("factor", factor), ("max_steps", max_steps))
                 if value is not None}
    generation_config = resolve_generation_config(model_dir, config, overrides)
    loaded, data_fingerprint = load_vqa_data(data_path)
    dataset, split = pick_split(loaded, split, data_path)
    dataset = with_answers(dataset)
    check_columns(dataset, f"--data {data_path}")
    ids = question_ids(dataset, data_path)
    check_answers(dataset, metric, data_path)
    check_images(dataset, data_path)

    generation_settings = {key: value for key, value in generation_config.to_diff_dict().items()
                           if key != "transformers_version"}
    run_config = json.loads(json.dumps({
        "model": str(model_dir), "model_fingerprint": model_fingerprint(model_dir),
        "data": str(data_path), "split": split, "data_fingerprint": data_fingerprint,
        "images_fingerprint": image_files_fingerprint(dataset, data_path),
        "metric": metric, "budget": budget, "dtype": dtype, "generation": generation_settings,
    }))
    with exclusive_lock(out_dir):  # one run per --out at a time
        prepare_output(out_dir, run_config, overwrite)
        predictions_path = out_dir / PREDICTIONS_NAME
        answered = {record["id"] for record in read_predictions(predictions_path)}
        wanted = list(range(len(dataset) if limit is None else min(limit, len(dataset))))
        pending = [row for row in wanted if ids[row] not in answered]
        bad = find_bad_images(dataset, pending, data_path)
        if bad and on_bad_image == "error":
            raise ValueError(bad_images_message(bad, ids, data_path))
        if bad:
            with open(predictions_path, "a", encoding="utf-8") as stream:
                for row, reason in bad.items():
                    record = {"id": ids[row], "question": dataset[row]["question"], "prediction": None,
                              "answers": dataset[row]["answers"], "score": None, "error": reason}
                    stream.write(json.dumps(record, ensure_ascii=False) + "\n")
                stream.flush()
                os.fsync(stream.fileno())
            pending = [row for row in pending if row not in bad]

        if pending:
            device = resolve_device(device)
            model = ShirgLavidaForDiffusionLM.from_pretrained(model_dir, dtype=resolve_dtype(dtype)).to(device).eval()
            processor = AutoProcessor.from_pretrained(model_dir)
            budget_kwargs = {} if budget is None else {"shirg_budget": budget}
            bar = tqdm(total=len(wanted), initial=len(wanted) - len(pending), desc="eval", unit="question",
                       disable=not progress)
            with open(predictions_path, "a", encoding="utf-8") as stream, bar:
                for start in range(0, len(pending), batch_size):
                    rows = pending[start : start + batch_size]
                    batch = dataset.select(rows)
                    inputs = processor(
                        images=[load_image(source) for source in image_sources(dataset, rows, data_path)],
                        text=[build_prompt(question) for question in batch["question"]],
                        return_tensors="pt", **budget_kwargs,
                    ).to(device)
                    with torch.inference_mode():
                        output = model.generate(**inputs, generation_config=generation_config,
                                                return_dict_in_generate=True)
                    answers = [answer.strip() for answer in processor.batch_decode(output.sequences)]
                    passes, rates = output.num_forward_passes_per_row.tolist(), output.tokens_per_forward.tolist()
                    for row, question, gold, prediction, row_passes, rate in zip(
                            rows, batch["question"], batch["answers"], answers, passes, rates):
                        record = {"id": ids[row], "question": question, "prediction": prediction, "answers": gold,
                                  "score": question_score(metric, prediction, gold), "forward_passes": row_passes,
                                  "tokens_per_forward": rate}
                        stream.write(json.dumps(record, ensure_ascii=False) + "\n")
                    stream.flush()
                    os.fsync(stream.fileno())
                    bar.update(len(rows))

        records = read_predictions(predictions_path)
        scored = [record for record in records if "error" not in record]
        result = {
            **(compute_metrics(metric, scored) if scored else {get_metric(metric).key: None}),
            "metric": metric,
            "num_answered": len(scored),
            "num_failed": len(records) - len(scored),
            "failed_ids": [record["id"] for record in records if "error" in record],
            "num_questions": len(dataset),
            **forward_pass_summary(scored),
            "complete": len(records) == len(dataset),
            "run_config": run_config,
        }
        write_json_atomically(out_dir / METRICS_NAME, result)
    return result


def forward_pass_summary(records: list[dict]) -> dict:
    """Mean forward passes per answer (prefix encoding included) and tokens decoded per denoising pass."""
    counted = [record for record in records if record.get("forward_passes") is not None]
    if not counted:
        return {"mean_forward_passes": None, "mean_tokens_per_forward": None}
    return {"mean_forward_passes": sum(record["forward_passes"] for record in counted) / len(counted),
            "mean_tokens_per_forward": sum(record["tokens_per_forward"] for record in counted) / len(counted)}


def add_decoding_arguments(parser) -> None:
    """--decoding, --threshold, --factor, --max-steps (defaults: the model's generation config)."""
    parser.add_argument("--decoding", choices=("schedule", "threshold", "factor"),
                        help="tokens per step: the fixed schedule, or Fast-dLLM's threshold / factor rule")
    parser.add_argument("--threshold", type=float, help="score bar of --decoding threshold (e.g. 0.9)")
    parser.add_argument("--factor", type=float, help="f of --decoding factor (e.g. 1.0)")
    parser.add_argument("--max-steps", type=int, help="step cap per block of threshold / factor decoding")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="answer a VQA data set with a saved model; writes predictions.jsonl and metrics.json (resumable)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="save_pretrained folder with the processor")
    parser.add_argument("--data", required=True, metavar="PATH",
                        help="datasets.save_to_disk folder, or a json/jsonl/parquet file (columns image, question, "
                             "answers, optional id)")
    parser.add_argument("--metric", required=True, choices=tuple(METRICS),
                        help="; ".join(f"{name}: {metric.description}" for name, metric in METRICS.items()))
    parser.add_argument("--out", required=True, metavar="DIR", help="results folder (resumed if it holds this run)")
    parser.add_argument("--budget", type=int, metavar="K", help="SHIRG budget K (default: the model's)")
    parser.add_argument("--split", help="split of a multi-split data set")
    parser.add_argument("--max-new-tokens", type=int, metavar="L", help="answer length (default: the model's)")
    parser.add_argument("--block-length", type=int, help="diffusion block length (default: the model's)")
    parser.add_argument("--step-ratio", type=float, help="denoising steps per block / block length")
    add_decoding_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call (default 8)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N questions")
    add_device_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="discard the results in --out and start over")
    parser.add_argument("--on-bad-image", choices=BAD_IMAGE_POLICIES, default="error",
                        help="an unreadable image: stop before loading the model, listing them (error, default), or "
                             "record the question as failed with the reason and go on (skip)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = run_eval(
        args.model, args.data, args.metric, args.out, budget=args.budget, split=args.split,
        max_new_tokens=args.max_new_tokens, block_length=args.block_length, step_ratio=args.step_ratio,
        batch_size=args.batch_size, limit=args.limit, dtype=args.dtype, device=args.device, overwrite=args.overwrite,
        on_bad_image=args.on_bad_image, decoding=args.decoding, threshold=args.threshold, factor=args.factor,
        max_steps=args.max_steps,
    )
    name = get_metric(args.metric).key
    value = "n/a" if result[name] is None else f"{result[name]:.4f}"
    failed = f", {result['num_failed']} failed (unreadable images)" if result["num_failed"] else ""
    passes = "" if result["mean_forward_passes"] is None else (
        f"; {result['mean_forward_passes']:.1f} forward passes and {result['mean_tokens_per_forward']:.2f} "
        "tokens per forward per answer")
    print(f"{name}: {value} over {result['num_answered']} of {result['num_questions']} questions{failed} "
          f"({'complete' if result['complete'] else 'partial'}){passes}; results in {Path(args.out).resolve()}")
    return 0
