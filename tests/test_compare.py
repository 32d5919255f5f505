"""`shirg-hf compare` on the demo's tiny random model and a small synth set: the contract (numbers are meaningless
with random weights), resume, recall-only mode, and the oracle selection."""

import json
import math
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from shirg_hf import ShirgLavidaForDiffusionLM, ShirgSelector, cli, compare

GENERATION = ["--max-new-tokens", "4", "--block-length", "4"]
VARIANTS = "lowres,full,shirg:64,random:64,pooled:64,oracle:80"
NUM_QUESTIONS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare") / "demo_model"
    assert cli.main(["demo", "--random-tiny", "--out", str(folder), "--max-new-tokens", "4"]) == 0
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare_data") / "val"
    assert cli.main(["synth", "--out", str(folder), "--split", "val", "--n", "12", "--seed", "2"]) == 0
    return folder


@pytest.fixture(scope="module")
def finished_run(model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare_run") / "run"
    assert run_compare(model_dir, data_dir, out, "--batch-size", "4") == 0
    return out


@pytest.fixture
def generated_rows(monkeypatch):
    """The number of questions passed to generate, per call."""
    calls = []
    original = ShirgLavidaForDiffusionLM.generate

    def counting_generate(self, *args, **kwargs):
        calls.append(int(kwargs["input_ids"].shape[0]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ShirgLavidaForDiffusionLM, "generate", counting_generate)
    return calls


def run_compare(model_dir, data_dir, out, *extra, variants=VARIANTS) -> int:
    return cli.main(["compare", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out),
                     "--variants", variants, "--limit", str(NUM_QUESTIONS), *GENERATION, *extra])


def read_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_compare_writes_every_variant_with_its_numbers(finished_run, model_dir):
    results = json.loads((finished_run / "results.json").read_text())
    config = ShirgLavidaForDiffusionLM.config_class.from_pretrained(model_dir)
    summaries = {s["variant"]: s for s in results["variants"]}
    assert list(summaries) == VARIANTS.split(",") and results["complete"] and results["num_questions"] == 6
    lowres = math.prod(config.geometry.grid("native"))
    expected_tokens = {"lowres": lowres, "full": config.num_highres_patches, "shirg:64": 65, "random:64": 65,
                       "pooled:64": 65, "oracle:80": 81}
    for name, summary in summaries.items():
        assert summary["answered"] == NUM_QUESTIONS
        assert summary["visual_tokens"] == expected_tokens[name]
        # the prefix is the visual tokens plus the same text for every variant
        assert summary["prefix_tokens"] - summary["visual_tokens"] == pytest.approx(
            summaries["lowres"]["prefix_tokens"] - lowres)
        text = config.text_config
        per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 4  # float32
        assert summary["kv_cache_bytes"] == pytest.approx(per_token * summary["prefix_tokens"])
        low, high = summary["ci95"]
        assert 0 <= low <= summary["accuracy"] <= high <= 1 and summary["n"] == NUM_QUESTIONS
        assert sum(group["n"] for group in summary["by_question_type"].values()) == NUM_QUESTIONS
        assert sum(group["n"] for group in summary["by_answer_glyphs"].values()) == NUM_QUESTIONS
        assert summary["seconds_per_answer"] > 0 and 0 <= summary["evidence_recall"] <= 1
        assert summary["forward_passes_per_answer"] >= 2 and summary["tokens_per_forward"] > 0  # prefix + >= 1 step
    for name in ("lowres", "full", "pooled:64"):
        assert summaries[name]["evidence_recall"] == 1.0
    assert summaries["lowres"]["relative_seconds"] == 1.0

    records = read_records(finished_run)
    assert len(records) == NUM_QUESTIONS * 6 and len({r["id"] for r in records}) == len(records)
    oracle = [r for r in records if r["variant"] == "oracle:80" and r["evidence_patches"]]
    assert oracle and all(r["recall"] == 1.0 for r in oracle if r["evidence_patches"] <= 80)
    for record in records:
        assert record["correct"] == compare.exact_match(record["prediction"], record["answers"])
    report = (finished_run / "results.md").read_text()
    assert all(f"| {name} |" in report for name in summaries) and "| forward passes / answer |" in report
    with PIL.Image.open(finished_run / "accuracy_vs_tokens.png") as figure:
        assert figure.size[0] > 400


def test_compare_resumes_and_refuses_other_settings(model_dir, data_dir, tmp_path, generated_rows, capsys):
    out = tmp_path / "run"
    variants = "lowres,shirg:64"
    assert run_compare(model_dir, data_dir, out, "--batch-size", "3", variants=variants) == 0
    first = read_records(out)
    calls = len(generated_rows)
    assert run_compare(model_dir, data_dir, out, "--batch-size", "3", variants=variants) == 0
    assert len(generated_rows) == calls  # nothing left to answer

    # a crash in the middle of writing a batch: the cut line is dropped, only the missing questions are answered
    lines = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(lines[:-2]) + lines[-2][:20])
    generated_rows.clear()
    assert run_compare(model_dir, data_dir, out, "--batch-size", "3", variants=variants) == 0
    assert sum(generated_rows) == 2 * 2  # the two lost questions of shirg:64, plus their warm-up
    assert [r["id"] for r in read_records(out)] == [r["id"] for r in first]

    assert run_compare(model_dir, data_dir, out, variants="lowres,shirg:72") == 2
    assert "other settings" in capsys.readouterr().err
    assert run_compare(model_dir, data_dir, out, "--overwrite", variants="lowres") == 0
    assert {r["variant"] for r in read_records(out)} == {"lowres"}


def test_recall_only_matches_the_model_run(finished_run, model_dir, data_dir, tmp_path):
    out = tmp_path / "recall"
    assert cli.main(["compare", "--recall-only", "--tower", str(model_dir), "--data", str(data_dir), "--out",
                     str(out), "--variants", VARIANTS, "--limit", str(NUM_QUESTIONS)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["recall_only"] and all("accuracy" not in s for s in results["variants"])
    assert (out / "recall_vs_tokens.png").is_file() and not (out / "accuracy_vs_tokens.png").exists()
    recall = {r["id"]: r["recall"] for r in read_records(out)}
    assert recall == {r["id"]: r["recall"] for r in read_records(finished_run)}


def test_adaptive_variant_uses_the_processors_k_per_image(model_dir, data_dir, tmp_path):
    from transformers import AutoProcessor

    from shirg_hf.processing.processing_shirg_lavida import build_prompt

    out, recall_out = tmp_path / "answers", tmp_path / "recall"
    assert run_compare(model_dir, data_dir, out, "--batch-size", "4", variants="shirg:64-400,shirg:400") == 0
    assert cli.main(["compare", "--recall-only", "--tower", str(model_dir), "--data", str(data_dir), "--out",
                     str(recall_out), "--variants", "shirg:64-400", "--limit", str(NUM_QUESTIONS)]) == 0
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.selection = {**processor.selection, "adaptive_budget": [64, 400]}
    rows = datasets.load_from_disk(str(data_dir)).select(range(NUM_QUESTIONS))
    expected = [processor(images=[row["image"]], text=[build_prompt(row["question"])],
                          shirg_budget="adaptive")["shirg_budget"] for row in rows]  # K of each image alone
    records = [r for r in read_records(out) if r["variant"] == "shirg:64-400"]
    assert [r["visual_tokens"] for r in records] == [k + 1 for k in expected]  # K + the summary token
    assert len(set(expected)) > 1  # the sample holds images of different K
    fixed = {r["question_id"]: r["recall"] for r in read_records(out) if r["variant"] == "shirg:400"}
    for record in records:  # at K = K_max the adaptive variant keeps what the fixed one keeps
        if record["visual_tokens"] == 401:
            assert record["recall"] == fixed[record["question_id"]]
    recall = {r["question_id"]: (r["recall"], r["visual_tokens"]) for r in read_records(recall_out)}
    assert recall == {r["question_id"]: (r["recall"], r["visual_tokens"]) for r in records}
    summary = json.loads((out / "results.json").read_text())["variants"][0]
    assert summary["adaptive_budget"] == [64, 400] and summary["visual_tokens"] == pytest.approx(
        sum(expected) / len(expected) + 1)


def test_selection_overrides_reach_the_processor_and_the_selector(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "overridden"
    assert run_compare(model_dir, data_dir, out, "--batch-size", "4", "--selection", "summary=false",
                       "importance=attention_normalised", variants="shirg:64") == 0
    records = read_records(out)
    assert {r["visual_tokens"] for r in records} == {64}  # no summary token, in the prompt and from the selector
    config = ShirgLavidaForDiffusionLM.config_class.from_pretrained(model_dir)
    selector = ShirgSelector(**{**config.selection, "summary": False, "importance": "attention_normalised",
                                "budget": 64})
    recall_out = tmp_path / "recall"
    assert cli.main(["compare", "--recall-only", "--tower", str(model_dir), "--data", str(data_dir), "--out",
                     str(recall_out), "--variants", "shirg:64", "--limit", str(NUM_QUESTIONS), "--selection",
                     "summary=false", "importance=attention_normalised"]) == 0
    assert [r["recall"] for r in read_records(recall_out)] == [r["recall"] for r in records]
    assert selector.needs_attention()
    run_config = json.loads((out / "results.json").read_text())["run_config"]
    assert run_config["selection_overrides"] == {"summary": False, "importance": "attention_normalised"}
    assert run_compare(model_dir, data_dir, tmp_path / "bad", "--selection", "budget=80", variants="shirg:64") == 2
    assert "the variants name the method and K" in capsys.readouterr().err
    assert run_compare(model_dir, data_dir, tmp_path / "bad", "--selection", "weights", variants="shirg:64") == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert run_compare(model_dir, data_dir, tmp_path / "bad", "--selection", "bogus=1", variants="shirg:64") == 2
    assert "unknown keys ['bogus']" in capsys.readouterr().err


@pytest.mark.parametrize("variants, message", [("oracle:64-80", "adaptive K needs"), ("shirg:80-64", "KMIN <= KMAX"),
                                               ("shirg:64-", "KMIN-KMAX"), ("shirg:64-9999", "does not fit")])
def test_bad_adaptive_variants_are_refused(model_dir, data_dir, tmp_path, capsys, variants, message):
    assert run_compare(model_dir, data_dir, tmp_path / "run", variants=variants) == 2
    assert message in capsys.readouterr().err


def test_recall_only_with_a_preset_tower_and_the_oracle(data_dir, tmp_path):
    out = tmp_path / "recall"
    assert cli.main(["compare", "--recall-only", "--tower", "tiny", "--data", str(data_dir), "--out", str(out),
                     "--variants", "lowres,shirg:16,gradient:8,oracle:8,oracle:40"]) == 0
    records = read_records(out)
    assert len(records) == 12 * 5
    for record in records:
        if not record["evidence_patches"]:
            assert record["recall"] is None
        elif record["variant"] == "lowres":
            assert record["recall"] == 1.0
        elif record["variant"].startswith("oracle:"):
            budget = int(record["variant"].split(":")[1])
            assert (record["recall"] == 1.0) == (record["evidence_patches"] <= budget)
    assert any(r["variant"] == "oracle:8" and r["recall"] < 1 for r in records if r["evidence_patches"])


def test_tower_features_match_the_model(model_dir):
    model = ShirgLavidaForDiffusionLM.from_pretrained(model_dir).eval()
    tower = compare.load_tower(str(model_dir), model.config)
    pixels = torch.rand(2, 3, model.config.highres_image_size, model.config.highres_image_size)
    with torch.inference_mode():
        assert torch.equal(compare.tower_features(tower, model.config, pixels), model.vision_features(pixels))


def test_selector_priority_keeps_the_marked_patches_first():
    features = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0))
    priority = torch.zeros(2, 64, dtype=torch.bool)
    priority[0, [0, 9, 63]] = True
    priority[1, 5] = True
    for method in ("no_coverage", "shirg", "random", "gradient"):
        selector = ShirgSelector(method=method, budget=16, coverage_cells=(2, 2))
        plain = selector(features)
        chosen = selector(features, priority=priority)
        for row in range(2):
            assert set(priority[row].nonzero().flatten().tolist()) <= set(chosen.kept_indices[row].tolist())
        assert torch.equal(chosen.scores, plain.scores)
    unmarked = ShirgSelector(method="no_coverage", budget=16)(features, priority=torch.zeros(2, 64, dtype=torch.bool))
    assert torch.equal(unmarked.kept_indices, ShirgSelector(method="no_coverage", budget=16)(features).kept_indices)
    with pytest.raises(ValueError, match="pooled"):
        ShirgSelector(method="pooled", budget=16)(features, priority=priority)
    with pytest.raises(ValueError, match="bool tensor"):
        ShirgSelector(method="shirg", budget=16, coverage_cells=(2, 2))(features, priority=priority[:, :10])


def test_evidence_mask_and_wilson_interval():
    mask = compare.evidence_mask([[8, 8, 16, 16]], (128, 128), (16, 16)).reshape(16, 16)
    assert mask.sum() == 1 and mask[1, 1]
    mask = compare.evidence_mask([[7, 8, 9, 16], [120, 0, 128, 1]], (128, 128), (16, 16)).reshape(16, 16)
    assert set(zip(*np.nonzero(mask))) == {(1, 0), (1, 1), (0, 15)}
    mask = compare.evidence_mask([[0, 0, 11, 11]], (128, 128), (12, 12)).reshape(12, 12)  # 10.67 px patches
    assert set(zip(*np.nonzero(mask))) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert compare.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert compare.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert compare.exact_match("  Red ", ["red"]) and not compare.exact_match("red tag", ["red"])


def test_paired_difference_matches_the_paired_proportion_interval():
    def run(correct, recall=None):
        return [{"question_id": f"q{i}", "correct": i in correct, "recall": None if recall is None else recall[i]}
                for i in range(10)]

    both = compare.paired_difference(run(range(6)), run(range(5, 7)))  # five wins, one loss, n 10
    assert both["n"] == 10 and both["difference"] == pytest.approx(0.4)
    # discordant pairs b = 5, c = 1: var = (b + c - n d^2) / (n (n - 1)); half = z sqrt(var)
    half = compare.WILSON_Z * ((5 + 1 - 10 * 0.4 ** 2) / (10 * 9)) ** 0.5
    assert both["ci95"] == pytest.approx([0.4 - half, 0.4 + half])
    tie = compare.paired_difference(run(range(6)), run(range(6)))
    assert tie == {"difference": 0.0, "ci95": [0.0, 0.0], "n": 10}
    recall = [None, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    skipped = compare.paired_difference(run((), recall), run((), [0.5] * 10), key="recall")
    assert skipped["n"] == 9 and skipped["difference"] == pytest.approx((0.0 + 8 * 0.5) / 9)
    with pytest.raises(ValueError, match="same questions"):
        compare.paired_difference(run(range(6))[:9], run(range(6)))


@pytest.mark.parametrize("arguments, message", [
    (["--variants", "lowres,bogus:4"], "METHOD:K"),
    (["--variants", "lowres,lowres"], "distinct"),
    (["--variants", "shirg:10"], "does not fit this model"),
    (["--variants", "lowres", "--tower", "tiny"], "--tower only serves --recall-only"),
    (["--variants", "lowres", "--recall-only", "--tower", "tiny"], "--recall-only needs one of"),
    (["--variants", "lowres", "--batch-size", "0"], "--batch-size must be an integer >= 1"),
])
def test_bad_arguments_are_one_line_errors(model_dir, data_dir, tmp_path, capsys, arguments, message):
    out = tmp_path / "bad"
    assert cli.main(["compare", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out),
                     *arguments]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not out.exists()


def test_data_without_the_synth_columns_is_refused(model_dir, tmp_path, capsys):
    data = tmp_path / "plain"
    datasets.Dataset.from_dict({"image": [PIL.Image.new("RGB", (32, 32))], "question": ["Q?"], "answers": [["a"]]},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "question": datasets.Value("string"),
                                                           "answers": datasets.List(datasets.Value("string"))}),
                               ).save_to_disk(str(data))
    assert cli.main(["compare", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                     "--variants", "lowres"]) == 2
    assert "shirg-hf synth" in capsys.readouterr().err
