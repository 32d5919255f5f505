"""Benchmark answer metrics (DocVQA ANLS, ChartQA relaxed accuracy, VQAv2/TextVQA accuracy) as `evaluate` modules.

Each metric is one script in this folder that `evaluate.load` accepts by path, offline (`HF_HUB_OFFLINE=1` is fine),
and one entry of `METRICS` (its `--metric` name -> result key, `evaluate` class, per-question score). Adding a
metric is one module plus one entry; `shirg-hf eval` and the examples read the registry:

    >>> from shirg_hf import metrics
    >>> metrics.load("anls").compute(predictions=["Hello world"], references=[["hello world"]])
    {'anls': 1.0}
    >>> metrics.VqaAccuracy().compute(predictions=["two"], references=[["2"] * 10])
    {'vqa_accuracy': 1.0}

`compute(predictions=[str, ...], references=[[str, ...], ...])` returns `{key: float}` with the value in [0, 1].
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .anls import Anls, anls_score
from .relaxed_accuracy import RelaxedAccuracy, relaxed_score
from .vqa_accuracy import VqaAccuracy, vqa_accuracy_score

METRICS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Metric:
    """A registered answer metric: `key` names its script (`<key>.py`) and its `compute` result."""

    key: str
    module: type
    score: Callable[[str, list], float]  # one question: (prediction, gold answers) -> score; compute is their mean
    description: str


METRICS = {
    "anls": Metric("anls", Anls, anls_score, "ANLS (DocVQA, InfographicVQA)"),
    "relaxed": Metric("relaxed_accuracy", RelaxedAccuracy, relaxed_score, "relaxed accuracy (ChartQA)"),
    "vqa": Metric("vqa_accuracy", VqaAccuracy, vqa_accuracy_score, "VQA accuracy (VQAv2, TextVQA)"),
}


def get_metric(name: str) -> Metric:
    """The metric registered as `name` (its `--metric` name or its key)."""
    for cli_name, metric in METRICS.items():
        if name in (cli_name, metric.key):
            return metric
    raise ValueError(f"unknown metric {name!r}; expected one of {', '.join(m.key for m in METRICS.values())} "
                     f"(or their --metric names {', '.join(METRICS)})")


def metric_script(name: str) -> Path:
    """Absolute path of the `evaluate` script of metric `name`."""
    return METRICS_DIR / f"{get_metric(name).key}.py"


def load(name: str, **load_kwargs):
    """`evaluate.load` of metric `name` by its local path: no Hub access."""
    import evaluate

    return evaluate.load(str(metric_script(name)), **load_kwargs)


__all__ = ["METRICS", "Anls", "Metric", "RelaxedAccuracy", "VqaAccuracy", "get_metric", "load", "metric_script"]
