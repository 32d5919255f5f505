"""Shared pytest options, fixtures, thread count and the suite's float tolerance policy.

Tests are CPU-only, offline and use tiny configs.

Tolerance policy (every float comparison in the suite follows it)
-----------------------------------------------------------------
1. Bit-exact (`torch.equal`, `atol=0`) only where it holds by construction: the same kernel on the same shapes
   with the same reduction order, in one process or in processes with the same thread count (see below). E.g. a
   repeated call, a saved and reloaded model, a cached call against its repeat, per-image selection alone or in a
   batch (each image is scored on its own), `lm_head` applied to the same slice.
2. Otherwise (another batch size, padding, sequence length, attention kernel, an independent reference written
   with other ops), float32 sums are ordered differently; which order a kernel picks depends on the shapes, the
   thread count and the CPU's SIMD width (AVX-512 / AVX2 / `ATEN_CPU_CAPABILITY=default`), so the results
   differ by rounding. `fp32_tolerance(n, magnitude)` bounds that difference for a reduction of length n (for a
   network, the summed lengths of its chained reductions: `llada_reduction_length`) whose results have size
   `magnitude`; use `assert_fp32_close`.
3. Parity with the ORIGINAL LaViDa code (golden data, computed once by other code): the golden README's float32
   tolerances, `GOLDEN_LOGITS_TOLERANCE` (logits, hidden states, cache) and `GOLDEN_VISION_ATOL` (vision).
Tolerances are never tuned to pass: a comparison that needs more than rule 2 gives is a bug to find.

Threads: PyTorch defaults to one thread per core, and on a machine where another process holds a core, the
tiny models here run 10-100x slower with 2 threads than with 1 (oversubscription). The suite therefore uses
`OMP_NUM_THREADS` when it is set and otherwise min(2, available cores): 2 runs the multi-threaded kernels, more
only adds synchronisation to these tiny ones, and waiting threads sleep (`OMP_WAIT_POLICY=PASSIVE` unless set)
instead of spinning on a core another process needs. The count is exported as `OMP_NUM_THREADS`, so
subprocesses run with the same count as the test process (results compared across processes stay bit-exact by
construction). Tests of thread invariance set their thread counts themselves (`torch.set_num_threads`). CI runs
the suite twice, with the default (2 threads) and with `OMP_NUM_THREADS=1`.
"""

import math
import os
import sys
from pathlib import Path

import pytest

# Waiting OpenMP threads sleep instead of spinning: where another process holds a core, spinning threads stall
# the whole team (measured: 3-5x slower runs). libgomp reads this once, when torch loads it, so before the import.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# float32 machine epsilon, 2^-23 (the unit roundoff of round-to-nearest is eps / 2).
FLOAT32_EPS = torch.finfo(torch.float32).eps
# Tail allowance of `fp32_tolerance`: P(|z| > 5) = 5.7e-7 for a normal z, so the largest of the ~1e5 elements
# a test compares stays below 5 standard deviations.
FP32_SIGMAS = 5.0
# The golden README's suggested float32 checks against the original LaViDa outputs.
GOLDEN_LOGITS_TOLERANCE = dict(atol=2e-4, rtol=1e-4)
GOLDEN_VISION_ATOL = 1e-4


def fp32_tolerance(reduction_length: int, magnitude: float = 1.0) -> float:
    """Largest expected |a - b| of two float32 evaluations of one value with differently ordered reductions.

    Each float32 addition rounds to nearest with a relative error uniform in [-u, u], u = eps / 2 (standard
    deviation u / sqrt(3)). Summing n terms whose partial sums are of the result's size `magnitude` M rounds n
    times: standard deviation u sqrt(n / 3) M, in any order (recursive, blocked or SIMD-lane sums alike; the
    worst case n u M needs adversarial inputs). Two evaluations in different orders round independently, so
    their difference has standard deviation sqrt(2) u sqrt(n / 3) M; the bound is `FP32_SIGMAS` of those:
    about 1.0 eps sqrt(n) M. Chained reductions (layers) add their lengths: the errors are relative and the
    normalisations keep every layer's scale.
    """
    return FP32_SIGMAS * math.sqrt(2.0 / 3.0) * (FLOAT32_EPS / 2) * math.sqrt(reduction_length) * magnitude


def llada_reduction_length(config, key_length: int) -> int:
    """Summed length of the float32 reductions from the embeddings to the logits of a LLaDA forward.

    Per layer: two RMSNorms (hidden), the q/k/v projections (hidden), the scores (head_dim), the softmax
    normaliser and the weighted values (key_length each), the output and gate/up projections (hidden) and the
    down projection (intermediate); then the final RMSNorm and the LM head (hidden).
    """
    hidden, head_dim = config.hidden_size, config.head_dim
    per_layer = 5 * hidden + head_dim + 2 * key_length + config.intermediate_size
    return config.num_hidden_layers * per_layer + 2 * hidden


def merged_lora_reduction_length(config, key_length: int) -> int:
    """Reductions that differ between a projector LoRA merged into its weights and applied beside them.

    `config`: a `ShirgLavidaConfig`. The merged weights W + s B A round once; the projector's two matmuls
    (vision hidden, text hidden) and the rank-r path B (A x) (r <= text hidden) then reduce in other orders, and
    the LM repeats every reduction on the slightly different embeddings.
    """
    text = config.text_config
    return config.vision_config.hidden_size + 2 * text.hidden_size + llada_reduction_length(text, key_length)


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, reduction_length: int, msg=None) -> None:
    """`actual` equals `expected` up to `fp32_tolerance(reduction_length, max |expected|)` (policy rule 2)."""
    atol = fp32_tolerance(reduction_length, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=msg)


def _suite_threads() -> int:
    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if explicit:
        if not explicit.isdigit() or int(explicit) < 1:
            raise pytest.UsageError(f"OMP_NUM_THREADS={explicit!r}: expected a positive integer")
        return int(explicit)
    return min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def pytest_configure(config):
    threads = _suite_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)  # subprocesses: the same count as this process
    torch.set_num_threads(threads)


def pytest_report_header(config):
    return f"torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS; default min(2, cores)), " \
           f"CPU capability: {torch.backends.cpu.get_cpu_capability()}"

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GOLDEN_DIR = REPO_ROOT.parent / "shared" / "golden"


def pytest_addoption(parser):
    parser.addoption(
        "--golden-dir",
        default=str(DEFAULT_GOLDEN_DIR),
        help="folder with the original LaViDa golden data (default: ../shared/golden next to the repo)",
    )


@pytest.fixture(scope="session")
def golden_dir(request) -> Path:
    path = Path(request.config.getoption("--golden-dir"))
    if not (path / "lm_cases.json").is_file():
        pytest.skip(f"golden data not found at {path} (pass --golden-dir=PATH to run the parity tests)")
    return path


@pytest.fixture(scope="session")
def fake_hub():
    """A loopback Hugging Face Hub (tests/hub_server.py) for the session, stopped at teardown.

    huggingface_hub reads HF_ENDPOINT when imported, so talk to it from subprocesses:
    `subprocess.run(..., env=fake_hub.client_env(hf_home))`.
    """
    from hub_server import FakeHub

    hub = FakeHub.start()
    yield hub
    hub.stop()
