"""Answer metrics (shirg_hf.metrics): hand-checked values, input errors, offline loading by path, installed copy."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import evaluate
import pytest

from shirg_hf import metrics

REPO_ROOT = Path(__file__).resolve().parents[1]


def score(name: str, predictions, references) -> float:
    """The metric's value for these inputs, through `evaluate.load` by path (the public entry point)."""
    result = metrics.load(name).compute(predictions=predictions, references=references)
    assert list(result) == [name]
    return result[name]


# --- loading -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, cls",
    [("anls", metrics.Anls), ("relaxed_accuracy", metrics.RelaxedAccuracy), ("vqa_accuracy", metrics.VqaAccuracy)],
)
def test_load_returns_the_script_class_as_evaluation_module(name, cls):
    loaded = metrics.load(name)
    assert isinstance(loaded, evaluate.EvaluationModule)
    assert loaded.name == name
    # evaluate imports a cached copy of the script; the exported class is the one defined in that same script.
    assert type(loaded).__name__ == cls.__name__
    assert cls.__module__ == f"shirg_hf.metrics.{name}"
    assert Path(sys.modules[type(loaded).__module__].__file__).read_text() == metrics.metric_script(name).read_text()


def test_classes_compute_like_the_loaded_modules():
    predictions, references = ["Hello world", "abxy"], [["hello world"], ["abcd"]]
    # 1.0 (identical after normalisation) and 1 - 2/4 = 0.5 -> mean 0.75
    assert metrics.Anls().compute(predictions=predictions, references=references) == {"anls": 0.75}
    assert metrics.load("anls").compute(predictions=predictions, references=references) == {"anls": 0.75}


def test_add_and_add_batch_accumulate():
    metric = metrics.load("relaxed_accuracy")
    metric.add(prediction="10.4", reference=["10"])  # 0.4 / 10 = 4% -> correct
    # 1 / 10 = 10% -> wrong; "yes" vs "Yes" ignoring case -> correct
    metric.add_batch(predictions=["11", "yes"], references=[["10"], ["Yes"]])
    assert metric.compute() == {"relaxed_accuracy": pytest.approx(2 / 3)}


def test_unknown_metric_name():
    with pytest.raises(ValueError, match="unknown metric 'bleu'.*anls, relaxed_accuracy, vqa_accuracy"):
        metrics.load("bleu")


# --- ANLS --------------------------------------------------------------------------------------------------------
def test_anls_hf_notes_example_uses_the_official_threshold():
    # "Hello world" vs "hello world": equal after lower-casing -> 1.0
    # "42" vs "41": distance 1 / max length 2 = 0.5 -> similarity 0.5, kept (the official script zeroes only
    #   similarities *below* 0.5); "42" vs "forty two": distance 9 / 9 -> 0. Best: 0.5
    # "foo" vs "bar": distance 3 / 3 -> 0
    # mean = (1 + 0.5 + 0) / 3 = 0.5   (HF-NOTES' 0.3333 assumed "NL < 0.5" strictly, the paper's wording)
    value = score("anls", ["Hello world", "42", "foo"], [["hello world"], ["41", "forty two"], ["bar"]])
    assert value == pytest.approx(0.5)


def test_anls_one_third():
    # 1.0; "4200" vs "41": distance 3 (one substitution, two deletions) / 4 = 0.75 -> similarity 0.25 < 0.5 -> 0; 0
    # mean = 1 / 3
    value = score("anls", ["Hello world", "4200", "foo"], [["hello world"], ["41"], ["bar"]])
    assert value == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [
        ("abce", "abcd", 0.75),  # distance 1 / 4
        ("abxy", "abcd", 0.5),  # distance 2 / 4 = 0.5 -> similarity 0.5, at the threshold: kept
        ("axyz", "abcd", 0.0),  # distance 3 / 4 -> similarity 0.25 < 0.5 -> 0
        ("PARIS", "paris", 1.0),  # case-insensitive
        ("new   york", " New York", 1.0),  # whitespace collapsed and stripped
        # distance on normalised strings ("pariss" vs "paris" = 1) over the longer *raw* length (8 with the two
        # leading spaces), as the official script does: 1 - 1/8
        ("  pariss", "paris", 0.875),
        ("", "", 1.0),  # both empty: distance 0
        ("", "abc", 0.0),  # distance 3 / 3
    ],
)
def test_anls_single_question(prediction, gold, expected):
    assert score("anls", [prediction], [[gold]]) == pytest.approx(expected)


def test_anls_takes_the_best_gold_answer():
    # vs "london": distance 6 / 6 -> 0; vs "Paris ": distance 0 -> 1.0 (the raw length 6 does not matter at 0)
    assert score("anls", ["paris"], [["london", "Paris "]]) == 1.0


# --- ChartQA relaxed accuracy ------------------------------------------------------------------------------------
def test_relaxed_accuracy_hf_notes_example():
    # |10.4 - 10| / 10 = 0.04 <= 0.05; "Yes" == "yes" ignoring case; "7%" -> 7 / 100 = 0.07 == 0.07  -> 3 / 3
    assert score("relaxed_accuracy", ["10.4", "Yes", "7%"], [["10"], ["yes"], ["0.07"]]) == 1.0


def test_relaxed_accuracy_pix2struct_test_case():
    # pix2struct/metrics_test.py expects relaxed_accuracy 62.5 (percent) for these:
    # abc/abc ok; abc/Abc ok (case); Abc/abc ok; 100% = 1.0 vs 96% = 0.96: 0.04 / 0.96 = 4.2% ok;
    # 1.0 vs 0.94: 0.06 / 0.94 = 6.4% wrong; 1.0 vs 0.96 ok; 1.0 vs 0.94 wrong; Don't vs Won't wrong  -> 5 / 8
    predictions = ["abc", "abc", "Abc", "100%", "100%", "100%", "100%", "Don't"]
    references = [["abc"], ["Abc"], ["abc"], ["96%"], ["94%"], ["0.96"], ["0.94"], ["Won't"]]
    assert score("relaxed_accuracy", predictions, references) == 0.625


@pytest.mark.parametrize(
    "prediction, target, correct",
    [
        ("105", "100", True),  # 5 / 100 = 0.05: the bound is inclusive
        ("105.1", "100", False),  # 5.1%
        ("-10.4", "-10", True),  # |-0.4| / |-10| = 4%
        ("50%", "0.5", True),  # 50 / 100 = 0.5
        ("0.0", "0", False),  # a zero target falls back to string match: "0.0" != "0"
        ("0", "0", True),
        ("5", "five", False),  # non-numeric target: string match
        ("1,000", "1000", False),  # like pix2struct, "1,000" is not a number
        ("Blue", "blue", True),
        (" blue", "blue", False),  # no stripping in the string match
    ],
)
def test_relaxed_correctness_cases(prediction, target, correct):
    assert score("relaxed_accuracy", [prediction], [[target]]) == float(correct)


def test_relaxed_accuracy_takes_the_best_target():
    # "cat": string mismatch; 12 vs 12.5: 0.5 / 12.5 = 4% -> correct
    assert score("relaxed_accuracy", ["12"], [["cat", "12.5"]]) == 1.0


# --- VQA accuracy ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prediction, gold",
    [
        ("two", "2"),  # number word -> digit
        ("2", "Two"),  # gold answers are normalised too
        ("a dog", "dog"),  # article removed
        ("the dog", "a dog"),
        ("isnt", "isn't"),  # missing apostrophe restored; the apostrophe itself is kept
        ("yes.", "yes"),  # period not followed by a digit removed
        ("t-shirt", "t shirt"),  # punctuation not touching a space -> space
        ("hello, world", "hello world"),  # punctuation touching a space -> deleted
        ("1,000", "1000"),  # comma between digits: all punctuation deleted
        ("Nokia", "nokia"),  # lower-cased
        ("red\tand white ", "red and white"),  # tabs / newlines -> spaces, stripped
    ],
)
def test_vqa_normalisation_matches(prediction, gold):
    # all 10 humans gave `gold`: every leave-one-out subset has 9 matches -> min(1, 9/3) = 1
    assert score("vqa_accuracy", [prediction], [[gold] * 10]) == 1.0


@pytest.mark.parametrize(
    "prediction, gold",
    [
        ("3.5", "35"),  # a period before a digit is kept
        ("2:30", "230"),  # colons are kept
        ("girl's", "girls"),  # apostrophes are kept
        ("dog", "cat"),
    ],
)
def test_vqa_normalisation_keeps_apart(prediction, gold):
    assert score("vqa_accuracy", [prediction], [[gold] * 10]) == 0.0


@pytest.mark.parametrize(
    "matching, expected",
    [
        # n matching of 10 answers. Leaving out a matching answer leaves n-1 matches, a non-matching one leaves n.
        (4, 1.0),  # (4 * min(1, 3/3) + 6 * min(1, 4/3)) / 10 = 1
        (3, 0.9),  # (3 * 2/3 + 7 * 3/3) / 10 = (2 + 7) / 10
        (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10
        (1, 0.3),  # (1 * 0 + 9 * 1/3) / 10 = 3 / 10
        (0, 0.0),
    ],
)
def test_vqa_leave_one_out(matching, expected):
    gold = ["yes"] * matching + ["no"] * (10 - matching)
    assert score("vqa_accuracy", ["yes"], [gold]) == pytest.approx(expected)


def test_vqa_mean_over_questions():
    gold = [["two"] * 3 + ["three"] * 7, ["cat"] * 2 + ["dog"] * 8, ["red"] + ["blue"] * 9]
    # "2" matches "two" in 3 of 10 -> 0.9; "cat" 2 of 10 -> 0.6; "red" 1 of 10 -> 0.3; mean (0.9+0.6+0.3)/3 = 0.6
    assert score("vqa_accuracy", ["2", "cat", "red"], gold) == pytest.approx(0.6)


# --- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [metric.key for metric in metrics.METRICS.values()])
@pytest.mark.parametrize(
    "predictions, references, message",
    [
        (["a", "b"], [["a", "b"]], "got 2 predictions but 1 references"),
        (["a"], [[]], r"references\[0\] is empty"),
        (["a", "b"], [["a", "b"], "bc"], r"references\[1\] is 'bc', expected a list"),
        (["a", 3], [["a", "b"], ["c", "d"]], r"predictions\[1\] is a int"),
        (["a"], [["a", 1]], r"references\[0\] contains a int"),
        ([], [], "no predictions to score"),
    ],
)
def test_bad_input_raises_clear_value_error(name, predictions, references, message):
    with pytest.raises(ValueError, match=message):
        metrics.load(name).compute(predictions=predictions, references=references)


def test_vqa_refuses_a_single_gold_answer():
    with pytest.raises(ValueError, match=r"references\[1\] has 1 answer.*leave-one-out score is always 0"):
        metrics.VqaAccuracy().compute(predictions=["a", "b"], references=[["a", "a"], ["b"]])


# --- installed (non-editable) copy, offline ----------------------------------------------------------------------
def test_non_editable_install_ships_loadable_scripts_offline(tmp_path):
    """`pip install .` (built from a copy of the sources) ships the scripts; `evaluate.load` works with the Hub off."""
    pytest.importorskip("setuptools", reason="building without isolation (no network) needs setuptools installed")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    for folder in ("shirg_hf", "modeling", "processing"):
        shutil.copytree(REPO_ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(source)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    script = textwrap.dedent(
        """
        import json
        from shirg_hf import metrics
        results = {"module_file": metrics.__file__}
        results["anls"] = metrics.load("anls").compute(predictions=["abce"], references=[["abcd"]])["anls"]
        results["relaxed_accuracy"] = metrics.load("relaxed_accuracy").compute(
            predictions=["7%"], references=[["0.07"]])["relaxed_accuracy"]
        results["vqa_accuracy"] = metrics.load("vqa_accuracy").compute(
            predictions=["two"], references=[["2"] * 3 + ["3"] * 7])["vqa_accuracy"]
        print(json.dumps(results))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    completed = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, check=True, capture_output=True, text=True
    )
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert Path(results["module_file"]).is_relative_to(site)  # the installed copy, not the source tree
    # 1 - 1/4; 7% == 0.07; 3 of 10 -> 0.9 (see test_vqa_leave_one_out)
    assert results["anls"] == 0.75
    assert results["relaxed_accuracy"] == 1.0
    assert results["vqa_accuracy"] == pytest.approx(0.9)
    assert (tmp_path / "hf_home" / "modules" / "evaluate_modules" / "metrics" / "anls").is_dir()
