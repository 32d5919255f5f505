"""Diffusion generate(): prefix cache vs no cache, seconds per answer and answer tokens/s.

With the cache the prefix (P tokens) is encoded once and each of the S steps runs only the L answer tokens;
without it every step runs all P + L tokens. Counting token passes, the speedup is S(P + L) / (P + S L).
Attention makes the uncached path quadratic in P + L, so the measured speedup may exceed that figure; the LM
head (L positions either way) and the per-step sampler work pull it below.

    python benchmarks/bench_generate.py --threads 1          # P in {800, 2400}, L 64, S 32, batch 1
    python benchmarks/bench_generate.py --threads 1 --batch-size 4 --prompt-lengths 800

Mid-size model by default (hidden 512, 4 layers, 8 heads, SwiGLU 1536, vocab 2048: LLaDA-8B's proportions with
the LM head ~7% of the weights, small enough for 2 CPU cores). Random weights (speed does not depend on them),
float32, greedy, one block, `linear` schedule so that all S steps run. Each timing is the best of `--repeats`
runs (the first one warms up), the cached and uncached runs alternating so that both see the same machine load.
On a shared machine pass `--threads 1`: multi-threaded kernels stall whenever another process holds a core.

The answer-only steps multiply [B*L, D] matrices; on CPU such short GEMMs (64 rows at batch 1) run at roughly
60% of the throughput of the uncached path's [B*(P+L), D] ones, which is what separates batch 1 from theory.

`--sampler` times the sampler's own work instead: a stand-in model replays fixed random logits (no network),
so a whole `generate()` is the sampler (proposals, float64 scores, top-k writes, bookkeeping), timed as process
CPU time. The vectorised sampler and the per-row loop it replaced run side by side on the same logits and must
give the same tokens.

    python benchmarks/bench_generate.py --sampler --threads 1 --batch-sizes 1 8

`--decoding` times whole answers of the mid-size model under the decoding settings of issue 16 side by side
(LaViDa's default schedule, fewer steps, Fast-dLLM's threshold and factor rules): seconds per answer against
forward passes. Random weights are nearly uniform over the vocabulary, so the adaptive rules write one token per
step here (their pass counts on a trained model are in BENCHMARKS.md); what this measures is what a pass costs.

    python benchmarks/bench_generate.py --decoding --threads 1 --prompt-lengths 865 --repeats 3

glibc returns large freed buffers to the OS and page-faults them back at the next step, a cost that grows with
the buffers' size (batched ones more than per-row ones); `MALLOC_MMAP_THRESHOLD_=1073741824
MALLOC_TRIM_THRESHOLD_=4294967296` before the command keeps freed memory and times the tensor work alone.
"""

import argparse
import math
import time
from types import SimpleNamespace

import torch

from shirg_hf import LladaConfig, LladaForMaskedDiffusion
from shirg_hf.modeling.generation_diffusion import (
    diffusion_generate,
    propose_tokens,
    resolve_generation_config,
    token_confidence,
    transfer_schedule,
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[800, 2400], help="prefix lengths P")
    parser.add_argument("--answer-length", type=int, default=64, help="max_new_tokens L")
    parser.add_argument("--steps", type=int, default=32, help="denoising steps S")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per generate() call")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate-size", type=int, default=1536)
    parser.add_argument("--vocab-size", type=int, default=2048, help="LM head ~7%% of the weights, as in LLaDA-8B")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (best is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--sampler", action="store_true",
                        help="time the sampler alone (replayed logits): vectorised vs the former per-row loop")
    parser.add_argument("--decoding", action="store_true",
                        help="time answers under several decoding settings side by side (issue 16)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes of --sampler")
    parser.add_argument("--sampler-vocab-sizes", type=int, nargs="+", default=[2048, 126464],
                        help="vocabularies of --sampler (126,464 = LLaDA-8B's)")
    return parser.parse_args()


def build_model(args) -> LladaForMaskedDiffusion:
    vocab = args.vocab_size
    config = LladaConfig(
        vocab_size=vocab, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.prompt_lengths) + args.answer_length,
        mask_token_id=vocab - 1, eos_token_id=vocab - 2, pad_token_id=vocab - 2, bos_token_id=vocab - 3,
        eot_token_id=vocab - 4,
    )
    torch.manual_seed(0)
    return LladaForMaskedDiffusion(config).eval()


def time_cached_and_uncached(model, input_ids, repeats: int, **settings) -> dict[bool, tuple[float, int]]:
    """Best wall time of `repeats` runs and the forward-pass count, per `use_prefix_cache`.

    The two variants alternate so that both see the same machine load; the first run doubles as warm-up.
    """
    best, passes = {True: float("inf"), False: float("inf")}, {}
    for _ in range(repeats):
        for use_cache in (True, False):
            start = time.perf_counter()
            output = model.generate(input_ids=input_ids, use_prefix_cache=use_cache, return_dict_in_generate=True,
                                    **settings)
            best[use_cache] = min(best[use_cache], time.perf_counter() - start)
            passes[use_cache] = output.num_forward_passes
    return {use_cache: (best[use_cache], passes[use_cache]) for use_cache in (True, False)}


class ReplayCache:
    """Prefix cache stand-in: remembers which rows it holds."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows
        self.attention_mask = torch.ones(len(rows), 1, dtype=torch.bool)

    def select_rows(self, index: torch.Tensor) -> "ReplayCache":
        return ReplayCache(self.rows[index])


class ReplayModel(torch.nn.Module):
    """Returns fixed random logits [B, L, V] (row b's own) at every step: the sampler's work alone."""

    def __init__(self, batch_size: int, length: int, vocab_size: int):
        super().__init__()
        self.config = LladaConfig(vocab_size=vocab_size, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=length + 8,
                                  mask_token_id=vocab_size - 1, eos_token_id=vocab_size - 2,
                                  pad_token_id=vocab_size - 2, bos_token_id=None, eot_token_id=None)
        generator = torch.Generator().manual_seed(0)
        self.logits = 4 * torch.randn(batch_size, length, vocab_size, generator=generator)
        self.logits[..., vocab_size - 1] = -math.inf  # the mask id never wins: every step writes its count

    def encode_prefix(self, input_ids=None, inputs_embeds=None, attention_mask=None) -> ReplayCache:
        return ReplayCache(torch.arange(input_ids.shape[0]))

    def forward(self, input_ids=None, cache=None, **kwargs):
        return SimpleNamespace(logits=self.logits[cache.rows])


def per_row_generate(model, input_ids, **settings) -> torch.Tensor:
    """The sampler loop before vectorisation (one block per `counts`, a Python loop over rows, host syncs per row)."""
    config = resolve_generation_config(model, **settings)
    batch_size, length, mask_id = input_ids.shape[0], config.max_new_tokens, config.mask_token_id
    counts = transfer_schedule(length, config.steps, config.schedule)
    cache = model.encode_prefix(input_ids=input_ids)
    answer = torch.full((batch_size, length), mask_id, dtype=torch.long)
    for count in counts:
        masked = answer == mask_id
        active = masked.any(dim=-1)
        if count == 0 or not bool(active.any()):
            continue
        logits = model(input_ids=answer, cache=cache).logits
        for row in active.nonzero()[:, 0].tolist():
            candidates = masked[row].nonzero()[:, 0]
            candidate_logits = logits[row, candidates]
            x0 = propose_tokens(candidate_logits, config.temperature)
            confidence = torch.full((length,), -math.inf, dtype=torch.float64)
            confidence[candidates] = token_confidence(candidate_logits, x0, config.remasking, None)
            proposal = answer[row].clone()
            proposal[candidates] = x0
            chosen = confidence.topk(min(count, candidates.numel())).indices
            answer[row, chosen] = proposal[chosen]
    return answer


def bench_sampler(args):
    """Vectorised sampler vs the per-row loop on replayed logits, best of `--repeats`, alternating.

    Times are the process's CPU time (with `--threads 1`, the sampler's own work, whatever else the machine runs).
    """
    length, steps = args.answer_length, args.steps
    settings = dict(max_new_tokens=length, block_length=length, steps=steps, schedule="linear", temperature=0.0)
    print(f"sampler only (replayed logits); torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"L = {length}, S = {steps}, one block, greedy low_confidence, best of {args.repeats}")
    header = (f"{'batch':>5} | {'vocab':>6} | {'per-row CPU ms/step':>19} | {'vectorised CPU ms/step':>22} | "
              f"{'speedup':>7}")
    print(header)
    print("-" * len(header))
    for vocab_size in args.sampler_vocab_sizes:
        for batch_size in args.batch_sizes:
            model = ReplayModel(batch_size, length, vocab_size).eval()
            input_ids = torch.zeros(batch_size, 4, dtype=torch.long)
            best = {"per-row": math.inf, "vectorised": math.inf}
            for _ in range(args.repeats):
                for name, run in (("per-row", per_row_generate), ("vectorised", diffusion_generate)):
                    start = time.process_time()
                    run(model, input_ids, **settings)
                    best[name] = min(best[name], time.process_time() - start)
            reference = per_row_generate(model, input_ids, **settings)
            if not torch.equal(reference, diffusion_generate(model, input_ids, **settings)):
                raise SystemExit("the vectorised sampler and the per-row loop disagree")
            per_row, vectorised = (best[name] * 1000 / steps for name in ("per-row", "vectorised"))
            print(f"{batch_size:>5} | {vocab_size:>6} | {per_row:>19.2f} | {vectorised:>22.2f} | "
                  f"{per_row / vectorised:>6.2f}x")


DECODING_SETTINGS = {  # name: generate() settings on top of max_new_tokens = block_length = L
    "default (step_ratio 0.5, shift)": {},
    "step_ratio 0.25": {"step_ratio": 0.25},
    "threshold 0.9": {"decoding": "threshold", "threshold": 0.9},
    "factor 1.0": {"decoding": "factor", "factor": 1.0},
}


def bench_decoding(args):
    """Best wall time per answer and forward passes per decoding setting, the settings alternating per repeat."""
    model = build_model(args)
    length = args.answer_length
    print(f"model: hidden {args.hidden_size}, {args.layers} layers, {args.heads} heads, MLP {args.intermediate_size}, "
          f"vocab {args.vocab_size} (random weights); torch {torch.__version__}, {torch.get_num_threads()} CPU "
          f"threads; batch {args.batch_size}, L = {length}, greedy, best of {args.repeats}")
    header = f"{'P':>5} | {'decoding':<32} | {'passes / answer':>15} | {'s / answer':>10} | {'vs default':>10}"
    print(header)
    print("-" * len(header))
    generator = torch.Generator().manual_seed(1)
    for prefix_length in args.prompt_lengths:
        input_ids = torch.randint(0, args.vocab_size - 8, (args.batch_size, prefix_length), generator=generator)
        best, passes = dict.fromkeys(DECODING_SETTINGS, float("inf")), {}
        for _ in range(args.repeats):
            for name, settings in DECODING_SETTINGS.items():
                start = time.perf_counter()
                output = model.generate(input_ids=input_ids, max_new_tokens=length, block_length=length,
                                        temperature=0.0, return_dict_in_generate=True, **settings)
                best[name] = min(best[name], (time.perf_counter() - start) / args.batch_size)
                passes[name] = output.num_forward_passes
        default = best[next(iter(DECODING_SETTINGS))]
        for name in DECODING_SETTINGS:
            print(f"{prefix_length:>5} | {name:<32} | {passes[name]:>15d} | {best[name]:>10.3f} | "
                  f"{best[name] / default:>9.2f}x")


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sampler:
        bench_sampler(args)
        return
    if args.decoding:
        bench_decoding(args)
        return
    model = build_model(args)
    length, steps = args.answer_length, args.steps
    settings = dict(max_new_tokens=length, block_length=length, steps=steps, schedule="linear", temperature=0.0)
    print(f"model: hidden {args.hidden_size}, {args.layers} layers, {args.heads} heads, MLP {args.intermediate_size}, "
          f"vocab {args.vocab_size}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"batch {args.batch_size}, L = {length}, S = {steps}, best of {args.repeats}")
    header = (f"{'P':>5} | {'cache s/answer':>14} | {'cache tok/s':>11} | {'no-cache s/answer':>17} | "
              f"{'no-cache tok/s':>14} | {'passes':>7} | {'speedup':>7} | {'theory':>6} | {'ratio':>5}")
    print(header)
    print("-" * len(header))
    generator = torch.Generator().manual_seed(1)
    for prefix_length in args.prompt_lengths:
        input_ids = torch.randint(0, args.vocab_size - 8, (args.batch_size, prefix_length), generator=generator)
        timings = time_cached_and_uncached(model, input_ids, args.repeats, **settings)
        (cached, cached_passes), (uncached, uncached_passes) = timings[True], timings[False]
        cached, uncached = cached / args.batch_size, uncached / args.batch_size  # seconds per answer
        theory = steps * (prefix_length + length) / (prefix_length + steps * length)
        speedup = uncached / cached
        print(f"{prefix_length:>5} | {cached:>14.3f} | {length / cached:>11.1f} | {uncached:>17.3f} | "
              f"{length / uncached:>14.1f} | {cached_passes:>3}/{uncached_passes:<3} | {speedup:>6.2f}x | "
              f"{theory:>5.2f}x | {speedup / theory:>5.2f}")


if __name__ == "__main__":
    main()
