"""ChartQA relaxed accuracy as an `evaluate` module.

Follows `relaxed_correctness` of pix2struct (google-research/pix2struct, `pix2struct/metrics.py`), the reference
implementation of ChartQA's metric (Masry et al., 2022, after Methani et al., 2020), exactly:

- a string is numeric if Python's `float()` parses it; one ending in "%" is parsed without the trailing "%"s and
  divided by 100 ("7%" -> 0.07);
- if the prediction is numeric and the target is numeric and non-zero, the answer is correct when
  |prediction - target| / |target| <= 0.05;
- otherwise (either side non-numeric, or a target of 0) the strings must match case-insensitively, as given
  (no stripping: " 5" vs "5" fails the string match);
- per question the best result over the gold answers counts; the result is the mean over questions.

Nothing else is normalised: like pix2struct, "1,234" is not a number, and "0" / "0.0" are different strings.
The value is a fraction in [0, 1] (pix2struct reports percent).
"""

import evaluate

from ._inputs import ChecksAnswerInputs, answer_metric_info, check_not_empty

MAX_RELATIVE_CHANGE = 0.05

_DESCRIPTION = """\
ChartQA relaxed accuracy: a numeric answer is correct within 5% relative error of the gold answer ("x%" is read as
x/100), any other answer needs a case-insensitive exact match. Best over the gold answers, averaged over questions.
"""

_CITATION = """\
@inproceedings{masry2022chartqa,
  title={ChartQA: A Benchmark for Question Answering about Charts with Visual and Logical Reasoning},
  author={Masry, Ahmed and Long, Do Xuan and Tan, Jia Qing and Joty, Shafiq and Hoque, Enamul},
  booktitle={Findings of ACL},
  year={2022}
}
@inproceedings{lee2023pix2struct,
  title={Pix2Struct: Screenshot Parsing as Pretraining for Visual Language Understanding},
  author={Lee, Kenton and Joshi, Mandar and Turc, Iulia and Hu, Hexiang and Liu, Fangyu and Eisenschlos, Julian and
          Khandelwal, Urvashi and Shaw, Peter and Chang, Ming-Wei and Toutanova, Kristina},
  booktitle={ICML},
  year={2023}
}
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (list of str): one predicted answer per question.
    references (list of list of str): the gold answers of each question (ChartQA has one).
Returns:
    relaxed_accuracy (float): fraction of questions answered correctly, in [0, 1].
Examples:
    >>> relaxed = evaluate.load("path/to/shirg_hf/metrics/relaxed_accuracy.py")
    >>> relaxed.compute(predictions=["10.4", "Yes", "7%"], references=[["10"], ["yes"], ["0.07"]])
    {'relaxed_accuracy': 1.0}
"""


def parse_number(text: str):
    """`float(text)`, with a trailing "%" read as a percentage; None if `text` is not a number."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str) -> bool:
    """pix2struct's relaxed correctness of one prediction against one gold answer."""
    prediction_number = parse_number(prediction)
    target_number = parse_number(target)
    if prediction_number is not None and target_number:
        return abs(prediction_number - target_number) / abs(target_number) <= MAX_RELATIVE_CHANGE
    return prediction.lower() == target.lower()


def relaxed_score(prediction: str, gold_answers: list) -> float:
    """1.0 when the prediction is relaxed-correct for any gold answer, else 0.0."""
    return float(max(relaxed_correctness(gold, prediction) for gold in gold_answers))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RelaxedAccuracy(ChecksAnswerInputs, evaluate.Metric):
    """ChartQA relaxed accuracy; `compute` returns `{"relaxed_accuracy": float}`."""

    def _info(self):
        return answer_metric_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, ["https://arxiv.org/abs/2203.10244", "https://github.com/google-research/pix2struct"])

    def _compute(self, predictions, references):
        check_not_empty(predictions)
        correct = [relaxed_score(prediction, targets) for prediction, targets in zip(predictions, references)]
        return {"relaxed_accuracy": sum(correct) / len(correct)}
