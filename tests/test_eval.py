"""`shirg-hf eval` on a tiny synthetic VQA set with the demo's tiny model folder.

Generation is counted by wrapping `ShirgLavidaForDiffusionLM.generate`, so the tests see exactly which questions
a run answered (resume must skip the answered ones) and that bad input is refused before any generation.
"""

import json
from pathlib import Path

import datasets
import PIL.Image
import pytest

from shirg_hf import ShirgLavidaForDiffusionLM, cli, metrics
from shirg_hf.evaluation import question_score

QUESTIONS = ["What is the total?", "How many bars?", "Is it red?", "What does the title say?"]
ANSWERS = [["151.50"], ["4", "four"], ["no"], ["invoice"]]
GENERATION = ["--max-new-tokens", "4", "--block-length", "4"]
FEATURES = datasets.Features({
    "id": datasets.Value("string"), "image": datasets.Image(), "question": datasets.Value("string"),
    "answers": datasets.List(datasets.Value("string")),
})


def make_image(index: int) -> PIL.Image.Image:
    return PIL.Image.new("RGB", (40 + 9 * index, 60 - 7 * index), (50 * index, 120, 230 - 40 * index))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval") / "demo_model"
    assert cli.main(["demo", "--random-tiny", "--out", str(folder), "--max-new-tokens", "4"]) == 0
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval_data") / "vqa"
    rows = {"id": [f"q{index}" for index in range(len(QUESTIONS))],
            "image": [make_image(index) for index in range(len(QUESTIONS))],
            "question": QUESTIONS, "answers": ANSWERS}
    datasets.Dataset.from_dict(rows, features=FEATURES).save_to_disk(str(folder))
    return folder


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


def run_eval(model_dir, data, out, *extra) -> int:
    return cli.main(["eval", "--model", str(model_dir), "--data", str(data), "--out", str(out), *GENERATION,
                     *map(str, extra)])


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_writes_consistent_predictions_and_metrics_and_resumes(model_dir, data_dir, tmp_path, generated_rows):
    out = tmp_path / "run"
    assert run_eval(model_dir, data_dir, out, "--metric", "anls", "--limit", "2", "--batch-size", "2") == 0
    assert generated_rows == [2]
    first = (out / "predictions.jsonl").read_text()
    partial = json.loads((out / "metrics.json").read_text())
    assert (partial["num_answered"], partial["num_questions"], partial["complete"]) == (2, 4, False)

    # an interruption in the middle of writing a line: the cut line is dropped and its question answered again
    with open(out / "predictions.jsonl", "a") as stream:
        stream.write('{"id": "q2", "question": "Is it')
    assert run_eval(model_dir, data_dir, out, "--metric", "anls", "--batch-size", "3") == 0
    assert generated_rows == [2, 2]  # only q2 and q3: the two answered questions were not regenerated
    text = (out / "predictions.jsonl").read_text()
    assert text.startswith(first)
    records = read_lines(out / "predictions.jsonl")
    assert [record["id"] for record in records] == ["q0", "q1", "q2", "q3"]
    assert [record["question"] for record in records] == QUESTIONS
    assert [record["answers"] for record in records] == ANSWERS

    result = json.loads((out / "metrics.json").read_text())
    assert (result["num_answered"], result["num_questions"], result["complete"]) == (4, 4, True)
    predictions = [record["prediction"] for record in records]
    assert result["anls"] == metrics.load("anls").compute(predictions=predictions, references=ANSWERS)["anls"]
    for record in records:
        assert record["score"] == metrics.Anls().compute(predictions=[record["prediction"]],
                                                        references=[record["answers"]])["anls"]
    assert result["anls"] == pytest.approx(sum(record["score"] for record in records) / len(records))
    assert all(record["forward_passes"] >= 2 and record["tokens_per_forward"] > 0 for record in records)
    assert result["mean_forward_passes"] == pytest.approx(sum(r["forward_passes"] for r in records) / len(records))
    assert result["run_config"] == json.loads((out / "run_config.json").read_text())
    assert result["run_config"]["generation"]["max_new_tokens"] == 4

    # a third run has nothing left to answer
    assert run_eval(model_dir, data_dir, out, "--metric", "anls") == 0
    assert generated_rows == [2, 2]
    assert (out / "predictions.jsonl").read_text() == text

    # resumed in pieces = answered in one go (generation is batch-invariant)
    assert run_eval(model_dir, data_dir, tmp_path / "one_go", "--metric", "anls", "--batch-size", "4") == 0
    assert read_lines(tmp_path / "one_go" / "predictions.jsonl") == records


def test_eval_refuses_other_settings_unless_overwrite(model_dir, data_dir, tmp_path, generated_rows, capsys):
    out = tmp_path / "run"
    assert run_eval(model_dir, data_dir, out, "--metric", "relaxed", "--limit", "1") == 0
    before = {name: (out / name).read_bytes() for name in ("predictions.jsonl", "metrics.json", "run_config.json")}
    capsys.readouterr()
    for changed, difference in (
        (["--metric", "anls"], "metric: 'relaxed' before, 'anls' now"),
        (["--metric", "relaxed", "--budget", "64"], "budget: None before, 64 now"),
        (["--metric", "relaxed", "--step-ratio", "1.0"], "generation.step_ratio: 0.5 before, 1.0 now"),
    ):
        assert run_eval(model_dir, data_dir, out, *changed) == 2
        error = capsys.readouterr().err
        assert "holds results of a run with other settings" in error and "--overwrite" in error
        assert difference in error
    assert {name: (out / name).read_bytes() for name in before} == before
    assert generated_rows == [1]

    assert run_eval(model_dir, data_dir, out, "--metric", "anls", "--limit", "1", "--budget", "64", "--overwrite") == 0
    records = read_lines(out / "predictions.jsonl")
    assert len(records) == 1 and json.loads((out / "run_config.json").read_text())["budget"] == 64
    assert json.loads((out / "metrics.json").read_text())["metric"] == "anls"
    assert generated_rows == [1, 1]

    # an edited predictions file is not resumed from (only a cut-off last line is repaired)
    line = (out / "predictions.jsonl").read_text()
    for content, message in ((line + "not json\n" + line, "line 2 is not a JSON record"),
                             (line + line, "answers some ids more than once")):
        (out / "predictions.jsonl").write_text(content)
        assert run_eval(model_dir, data_dir, out, "--metric", "anls", "--budget", "64") == 2
        assert message in capsys.readouterr().err
        assert (out / "predictions.jsonl").read_text() == content
    assert generated_rows == [1, 1]

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    assert run_eval(model_dir, data_dir, stranger, "--metric", "anls") == 2
    assert "is not a shirg-hf eval folder" in capsys.readouterr().err
    assert sorted(path.name for path in stranger.iterdir()) == ["notes.txt"]


def save_rows(folder: Path, rows: dict, features=None) -> Path:
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return folder


def test_eval_reads_the_documented_answer_alias(model_dir, tmp_path):
    images = [make_image(0), make_image(1)]
    alias = save_rows(tmp_path / "alias", {"image": images, "question": ["a", "b"], "answer": ["x", "y"]})
    assert run_eval(model_dir, alias, tmp_path / "out", "--metric", "anls") == 0
    assert [record["answers"] for record in read_lines(tmp_path / "out" / "predictions.jsonl")] == [["x"], ["y"]]


def test_eval_refuses_bad_data_before_generating(model_dir, tmp_path, generated_rows, capsys):
    images = [make_image(0), make_image(1)]
    bad = {
        "missing column": ({"image": images, "question": ["a", "b"], "reply": ["x", "y"]},
                           "lacks the column(s) ['answers']"),
        "answers not a list": ({"image": images, "question": ["a", "b"], "answers": ["x", "y"]},
                               "column 'answers' must be a list of strings"),
        "repeated ids": ({"id": [7, 7], "image": images, "question": ["a", "b"], "answers": [["x"], ["y"]]},
                         "the id column repeats [7]"),
        "empty answers": ({"image": images, "question": ["a", "b"], "answers": [["x"], []]},
                          "references[1] is empty"),
    }
    for name, (rows, message) in bad.items():
        data = save_rows(tmp_path / name.replace(" ", "_"), rows)
        assert run_eval(model_dir, data, tmp_path / "out", "--metric", "anls") == 2, name
        assert message in capsys.readouterr().err, name
    single = save_rows(tmp_path / "single", {"image": images, "question": ["a", "b"], "answers": [["x"], ["y"]]})
    assert run_eval(model_dir, single, tmp_path / "out", "--metric", "vqa") == 2
    assert "needs the human answers" in capsys.readouterr().err
    assert generated_rows == [] and not (tmp_path / "out").exists()


def test_eval_refuses_a_budget_or_generation_setting_the_model_cannot_take(model_dir, data_dir, tmp_path,
                                                                           generated_rows, capsys):
    for extra, message in (
        (["--budget", "1000"], "--budget 1000 does not fit this model"),
        (["--budget", "10"], "--budget 10 does not fit this model"),
        (["--block-length", "3"], "block_length=3 does not divide max_new_tokens=4"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    ):
        assert run_eval(model_dir, data_dir, tmp_path / "out", "--metric", "anls", *extra) == 2
        assert message in capsys.readouterr().err
    assert run_eval(tmp_path, data_dir, tmp_path / "out", "--metric", "anls") == 2
    assert "has no config.json" in capsys.readouterr().err
    assert generated_rows == [] and not (tmp_path / "out").exists()


def test_eval_reads_a_jsonl_file_with_relative_image_paths(model_dir, tmp_path, generated_rows, capsys):
    data = tmp_path / "set" / "questions.jsonl"
    (data.parent / "images").mkdir(parents=True)
    lines = []
    for index in range(2):
        make_image(index).save(data.parent / "images" / f"{index}.png")
        lines.append({"image": f"images/{index}.png", "question": QUESTIONS[index], "answers": ANSWERS[index]})
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert run_eval(model_dir, data, tmp_path / "out", "--metric", "relaxed") == 0
    records = read_lines(tmp_path / "out" / "predictions.jsonl")
    assert [record["id"] for record in records] == [0, 1]  # no id column: the row index
    for record in records:
        assert record["score"] == question_score("relaxed", record["prediction"], record["answers"])
    assert generated_rows == [2]

    data.write_text(data.read_text().replace("images/1.png", "images/missing.png"))
    assert run_eval(model_dir, data, tmp_path / "out2", "--metric", "relaxed") == 2
    assert "1 image file(s) not found, e.g. ['images/missing.png']" in capsys.readouterr().err


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(model_dir, data_dir, tmp_path, generated_rows,
                                                                  capsys):
    import socket
    import subprocess
    import sys

    from shirg_hf import fileio

    out = tmp_path / "out"
    hold_lock = (  # a run in progress on `out` (fileio.py needs only the standard library: loaded by path)
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('fileio', {fileio.__file__!r})\n"
        "fileio = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(fileio)\n"
        "with fileio.exclusive_lock(sys.argv[1]):\n"
        "    print('ready', flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    first = subprocess.Popen([sys.executable, "-c", hold_lock, str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "ready\n"
        assert run_eval(model_dir, data_dir, out, "--metric", "anls", "--limit", "1") == 2
        error = capsys.readouterr().err
        assert f"is being written by pid {first.pid} on host {socket.gethostname()}" in error
        assert generated_rows == [] and not out.exists()
    finally:
        first.communicate("\n", timeout=60)
    assert run_eval(model_dir, data_dir, out, "--metric", "anls", "--limit", "1") == 0
    assert generated_rows == [1] and not (tmp_path / ".out.lock").exists()


def test_resume_is_refused_when_the_weights_change_with_the_same_shapes(model_dir, data_dir, tmp_path,
                                                                        generated_rows, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    out = tmp_path / "out"
    assert run_eval(model, data_dir, out, "--metric", "anls", "--limit", "1") == 0
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    size = weights.stat().st_size
    save_file({name: tensor + 1 if tensor.is_floating_point() else tensor for name, tensor in tensors.items()},
              weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size  # the same file size: only the contents tell the models apart
    assert run_eval(model, data_dir, out, "--metric", "anls") == 2
    assert "model_fingerprint" in capsys.readouterr().err
    assert generated_rows == [1]


def test_resume_is_refused_when_the_images_change(model_dir, tmp_path, generated_rows, capsys):
    # image files named by path: the data file itself is unchanged
    data = tmp_path / "set" / "questions.jsonl"
    (data.parent / "images").mkdir(parents=True)
    for index in range(2):
        make_image(index).save(data.parent / "images" / f"{index}.png")
    data.write_text("".join(json.dumps({"image": f"images/{index}.png", "question": QUESTIONS[index],
                                        "answers": ANSWERS[index]}) + "\n" for index in range(2)))
    assert run_eval(model_dir, data, tmp_path / "out", "--metric", "anls", "--limit", "1") == 0
    make_image(3).save(data.parent / "images" / "1.png")
    assert run_eval(model_dir, data, tmp_path / "out", "--metric", "anls") == 2
    assert "images_fingerprint" in capsys.readouterr().err

    # a save_to_disk folder whose image data changed under the same metadata
    folders = []
    for shift in (0, 1):
        folder = tmp_path / f"vqa{shift}"
        rows = {"id": ["q0", "q1"], "image": [make_image(index + shift) for index in range(2)],
                "question": QUESTIONS[:2], "answers": ANSWERS[:2]}
        datasets.Dataset.from_dict(rows, features=FEATURES).save_to_disk(str(folder))
        folders.append(folder)
    (folders[1] / "state.json").write_text((folders[0] / "state.json").read_text())
    assert run_eval(model_dir, folders[0], tmp_path / "out2", "--metric", "anls", "--limit", "1") == 0
    for arrow in folders[0].glob("*.arrow"):
        arrow.write_bytes((folders[1] / arrow.name).read_bytes())
    assert run_eval(model_dir, folders[0], tmp_path / "out2", "--metric", "anls") == 2
    assert "data_fingerprint" in capsys.readouterr().err
    assert generated_rows == [1, 1]
