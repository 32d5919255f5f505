"""Masked-diffusion sampler (LaViDa / LLaDA) with a read-only prefix cache.

The answer starts as `max_new_tokens` mask tokens. It is decoded left to right in blocks of
`block_length`; with the default schedule every block runs the same number of steps. At each step the model predicts every answer
position, a token x0 is proposed per position (argmax, Gumbel-max when `temperature > 0`), each masked
position of the current block is scored by the `remasking` strategy, and the `k` highest-scoring ones are
written, with `k` taken from the transfer schedule (`decoding="schedule"`, the default) or, with Fast-dLLM's
adaptive rules, from the scores themselves (`decoding="threshold"` / `"factor"`: a block runs until it is
decoded). Decoded tokens are never re-masked. All rows are scored and written at once with tensor ops; the one
host synchronisation per step reads which rows still decode. Rows with nothing left to decode in the current
block, and rows finished by `stop_at_eos`, leave the forward batch.

The prefix (prompt, image tokens, assistant header) is encoded ONCE by `model.encode_prefix`; every step
then runs only the answer tokens against that read-only cache (`use_prefix_cache=True`). With
`use_prefix_cache=False` every step re-runs the full `[prefix; answer]` sequence, so the prefix also attends
to the answer (the original's `prefix_lm=False`, the path its benchmark script actually ran).

Faithful to the original (LaViDa's `llava/model/language_model/llada/generate.py`):
schedule rounding, float64 confidences, the step-count rules, which positions compete, `topk` order, and
the unsuppressed argmax (the mask id, EOS and EOT may all win; a position whose argmax is the mask id stays
masked and competes again at the next step). Deliberate differences are marked **FIX** below.

The model handed to `diffusion_generate` must provide:
* `encode_prefix(input_ids=, inputs_embeds=, attention_mask=) -> cache` (read-only prefix cache) whose
  `cache.select_rows(index)` returns the cache of those prefix rows (used when some rows leave the batch);
* `__call__(input_ids=, inputs_embeds=, attention_mask=, cache=, logits_to_keep=)` returning `.logits [B, T, V]`
  (with `cache`: the answer only, at positions P..P+L-1 per row, P = real prefix length);
* `get_input_embeddings()`, `config` (or a composite config whose text config carries `mask_token_id`,
  `eos_token_id`, `eot_token_id`, `pad_token_id`, `hidden_size`, `max_position_embeddings`), and optionally
  `generation_config`. `LladaForMaskedDiffusion` is such a model.
"""

import math
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.utils import ModelOutput

# Transfer schedules. "linear" is the original's default (`schedule=None`): LLaDA's equal split with the
# remainder on the first steps. The others are LaViDa's named schedules, built from cumulative counts of
# sigma(t). "linear_sigma" is sigma(t) = t through that same rounding: what the original does for ANY
# unrecognised schedule name (e.g. its "linear"); it spreads remainders differently ((10, 4) -> [3, 2, 3, 2]
# instead of [3, 3, 2, 2]). Unknown names raise here instead of silently falling back.
SCHEDULES = ("linear", "linear_sigma", "shift", "cosine", "logit_normal")
# Confidence used to pick which masked positions to write. "entropy" is the original's "entrophy" (sic).
REMASKING_STRATEGIES = ("low_confidence", "random", "margin", "entropy")
# How many candidates a step writes: the transfer schedule's count, or Fast-dLLM's threshold / factor rules.
DECODING_RULES = ("schedule", "threshold", "factor")
# Scores that are probabilities, as the adaptive rules need.
ADAPTIVE_REMASKING = ("low_confidence", "margin")

DEFAULT_SHIFT = 3.0

# Diffusion-only fields of `DiffusionGenerationConfig` and their defaults.
DIFFUSION_DEFAULTS = {
    "block_length": None,
    "steps": None,
    "step_ratio": 0.5,
    "schedule": "shift",
    "schedule_kwargs": None,
    "remasking": "low_confidence",
    "decoding": "schedule",
    "threshold": 0.9,
    "factor": 1.0,
    "max_steps": None,
    "mask_token_id": None,
    "stop_at_eos": False,
    "use_prefix_cache": True,
    "seed": 0,
}
# Fields of the base `GenerationConfig` that the sampler uses.
SHARED_FIELDS = ("max_new_tokens", "temperature", "do_sample", "eos_token_id", "pad_token_id",
                 "return_dict_in_generate")
GENERATE_ARGUMENTS = tuple(DIFFUSION_DEFAULTS) + SHARED_FIELDS
# Autoregressive sampling / search flags of `GenerationConfig` that the sampler cannot honour, with their neutral
# values (a stored config may hold those). Any other value is refused, never silently ignored.
INAPPLICABLE_FLAGS = {
    "top_k": None, "top_p": None, "min_p": None, "top_h": None, "typical_p": None, "epsilon_cutoff": None,
    "eta_cutoff": None, "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "penalty_alpha": None,
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "length_penalty": None, "diversity_penalty": None, "bad_words_ids": None, "force_words_ids": None,
    "sequence_bias": None, "suppress_tokens": None, "begin_suppress_tokens": None, "min_new_tokens": None,
    "min_length": None, "max_length": None, "stop_strings": None,
}
# `do_sample=True` without a temperature samples at GenerationConfig's usual default.
DEFAULT_SAMPLING_TEMPERATURE = 1.0


# ----------------------------------------------------------------------------------------------------------
# Transfer schedules (pure functions, exactly the original's integer rounding)
# ----------------------------------------------------------------------------------------------------------


def get_num_transfer_tokens(mask_count: int, steps: int) -> list[int]:
    """LLaDA's equal split: `mask_count // steps` per step, the remainder added to the first steps.

    Steps are not capped: (5, 8) -> [1, 1, 1, 1, 1, 0, 0, 0] (zero-count steps never run a forward pass).
    """
    base, remainder = divmod(mask_count, steps)
    return [base + 1 if step < remainder else base for step in range(steps)]


def unit_linspace(points: int) -> torch.Tensor:
    """`torch.linspace(0, 1, points)` as ATen's vectorised (FMA) CPU kernels compute it, on every CPU.  # [points]

    The kernel fills the first half as `step * i` and the second as `1 - step * (points - 1 - i)` with a float32
    step; with FMA the second half is rounded once, without it (ATen's scalar build) twice, which moves some t
    by one ulp and changes truncated token counts. Exact float64 arithmetic then one rounding is the FMA result.
    """
    step = torch.tensor(1.0 / (points - 1), dtype=torch.float32).double()
    index = torch.arange(points, dtype=torch.float64)
    return torch.where(index < points // 2, step * index, 1.0 - step * (points - 1 - index)).float()


def schedule_sigmas(schedule: str, steps: int, shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    """sigma(t) at t = linspace(0, 1, steps + 1) in float32, as the original computes it.  # [steps + 1]"""
    t = unit_linspace(steps + 1)
    if schedule == "shift":
        return shift * t / (1 + (shift - 1) * t)
    if schedule == "cosine":
        return 1 - 0.5 * (1 + torch.cos(torch.pi * t))
    if schedule == "logit_normal":
        return 0.5 * (1 + torch.erf(torch.log(t / (1 - t)) / math.sqrt(2.0)))
    if schedule == "linear_sigma":
        return t
    raise ValueError(f"schedule_sigmas: no sigma(t) for schedule {schedule!r}; expected one of {SCHEDULES[1:]}.")


def get_named_schedule_tokens(mask_count: int, steps: int, schedule: str, shift: float = DEFAULT_SHIFT) -> list[int]:
    """LaViDa's named schedule, reproducing the original's rounding quirks exactly.

    Steps are capped at `mask_count`; cumulative counts `int(sigma(t) * mask_count)` (float32, truncated) are
    differenced, each step clamped to >= 1, the excess removed one unit at a time cycling from index 0 and
    skipping entries equal to 1, and the result REVERSED (so `shift` with s = 3 decodes few tokens early).
    """
    steps = min(steps, mask_count)
    cumulative = (schedule_sigmas(schedule, steps, shift) * mask_count).to(torch.int64).tolist()
    counts = [max(end - start, 1) for start, end in zip(cumulative[:-1], cumulative[1:])]
    excess = sum(counts) - mask_count
    index = 0
    while excess > 0:
        index %= len(counts)
        if counts[index] > 1:
            counts[index] -= 1
            excess -= 1
        index += 1
    return counts[::-1]


def transfer_schedule(mask_count: int, steps: int, schedule: str | None = "linear",
                      schedule_kwargs: dict | None = None) -> list[int]:
    """Tokens to write at each step of a block with `mask_count` masks (`None` means "linear")."""
    schedule = "linear" if schedule is None else schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; expected one of {SCHEDULES} (or None = 'linear').")
    if schedule == "linear":
        return get_num_transfer_tokens(mask_count, steps)
    shift = (schedule_kwargs or {}).get("shift", DEFAULT_SHIFT)
    return get_named_schedule_tokens(mask_count, steps, schedule, shift)


def steps_per_block(max_new_tokens: int, block_length: int | None, steps: int | None,
                    step_ratio: float | None) -> int:
    """Denoising steps run for each block.

    `steps` (LLaDA's meaning: total steps over all blocks) is split evenly over the blocks. Otherwise the
    original's rule: `block_length` steps per block, times `step_ratio` (truncated) when it is set.
    """
    block_length = max_new_tokens if block_length is None else block_length
    num_blocks = max_new_tokens // block_length
    if steps is not None:
        return steps // num_blocks
    if step_ratio is not None:
        return int(block_length * step_ratio)
    return block_length


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class DiffusionGenerationConfig(GenerationConfig):
    r"""Settings of the masked-diffusion sampler; saved as `generation_config.json` by `save_pretrained`.

    Args:
        max_new_tokens (`int`, defaults to 64): answer length L.
        block_length (`int`, *optional*): block size; must divide `max_new_tokens`. `None` = one block.
        steps (`int`, *optional*): total denoising steps over all blocks (a multiple of the number of
            blocks). Mutually exclusive with `step_ratio`; a call passing one of them drops the other.
        step_ratio (`float`, defaults to 0.5): steps per block = int(block_length * step_ratio), in (0, 1].
            With both `steps` and `step_ratio` `None`: one step per token (block_length steps per block).
        schedule (`str`, defaults to `"shift"`): `"linear"` (the original's default `schedule=None`:
            equal split), `"shift"`, `"cosine"`, `"logit_normal"`, or `"linear_sigma"` (see `SCHEDULES`).
        schedule_kwargs (`dict`, *optional*): `{"shift": s}` for `"shift"` (default s = 3, as `predict.py`;
            the paper's best is s = 1/3).
        remasking (`str`, defaults to `"low_confidence"`): `"low_confidence"` (probability of x0),
            `"random"`, `"margin"` (top-1 minus top-2 probability), `"entropy"` (negative entropy).
        decoding (`str`, defaults to `"schedule"`): how many candidates a step writes. `"schedule"`: the
            transfer schedule's count (LaViDa). `"threshold"` (Fast-dLLM): every candidate whose score is
            >= `threshold`. `"factor"` (Fast-dLLM): the n best for the largest n with (n + 1)(1 - c_n) < `factor`,
            c_n the n-th best score. Both adaptive rules write at least the best candidate per step, run a
            block until it is decoded (at most `max_steps` steps, the last writing every candidate left), ignore
            `steps` / `step_ratio` / `schedule`, and need a probability score (`remasking` "low_confidence" or
            "margin").
        threshold (`float`, defaults to 0.9): score bar of `decoding="threshold"`, in (0, 1].
        factor (`float`, defaults to 1.0): f of `decoding="factor"`, > 0.
        max_steps (`int`, *optional*): step cap per block of the adaptive rules (`None` = block_length).
        temperature (`float`, defaults to 0 = greedy, stored as `None`): Gumbel-max noise
            `exp(logits) / (-log u)^T` in float64 when > 0. Greedy by default so that outputs are
            deterministic and batch-invariant; the released demo samples at 0.1, the evaluation harness at 0.
        do_sample (`bool`, *optional*): as in `GenerationConfig`: `False` = greedy whatever the temperature,
            `True` = sample at `temperature` (1.0 when unset). Stored as `True` when sampling, else `None`.
        seed (`int` or `list[int]`, defaults to 0): seeds the noise of `temperature > 0` and of `"random"`
            remasking. Row b uses `seed + b` for an int, `seed[b]` for a list; pass a list of per-row seeds
            to make a row's sample independent of the batch it is in.
        mask_token_id (`int`, *optional*): taken from the model config when `None`.
        eos_token_id (`int` or `list[int]`): stop tokens for `stop_at_eos` (default: the model's EOT and EOS).
        pad_token_id (`int`): fills a stopped row after its first stop token (default: the model's pad id,
            `<|endoftext|>` for LLaDA, as LaViDa pads answers).
        stop_at_eos (`bool`, defaults to False): finish a row once every position up to and including its
            first stop token is decoded. Off by default: the original always runs every step.
        use_prefix_cache (`bool`, defaults to True): encode the prefix once and run only answer tokens per
            step; `False` re-runs `[prefix; answer]` every step (prefix attends to the answer).
        return_dict_in_generate (`bool`, defaults to False): return a `DiffusionGenerationOutput` with the
            per-step history, forward-pass counts and tokens per forward instead of the answer ids alone.

    Defaults are the released demo's (`predict.py`: L 64, one block of 64, step_ratio 0.5, `shift` s = 3)
    except `temperature` (0 instead of 0.1, see above). The autoregressive sampling and search flags of
    `GenerationConfig` (`top_k`, `top_p`, `num_beams`, `repetition_penalty`, ...) do not apply and are refused.
    """

    def __init__(self, **kwargs):
        for name, default in DIFFUSION_DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        if kwargs.get("max_new_tokens") is None:
            kwargs["max_new_tokens"] = 64
        # Greedy is stored as `temperature=None` and sampling as `do_sample=True`, so that a plain
        # `GenerationConfig` loading this file (as `from_pretrained` does) sees no "temperature without
        # do_sample" conflict. `temperature` 0 and None both mean greedy; `do_sample=False` means greedy.
        temperature, do_sample = kwargs.get("temperature"), kwargs.get("do_sample")
        if do_sample is not None and not isinstance(do_sample, bool):
            raise ValueError(f"do_sample must be True, False or None, got {do_sample!r}.")
        if do_sample is False:
            temperature = None
        elif do_sample and temperature is None:
            temperature = DEFAULT_SAMPLING_TEMPERATURE
        is_number = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
        if do_sample and is_number and temperature == 0:
            raise ValueError("do_sample=True with temperature=0: sampling needs a temperature > 0 (or pass "
                             "do_sample=False for greedy decoding).")
        kwargs["temperature"] = None if is_number and temperature == 0 else temperature
        kwargs["do_sample"] = True if is_number and temperature > 0 else None
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, model_config) -> "DiffusionGenerationConfig":
        """Defaults plus the special ids of a (text) model config: mask, stop (EOT, EOS), pad, bos."""
        text_config = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") \
            else model_config
        stop_ids = [getattr(text_config, name, None) for name in ("eot_token_id", "eos_token_id")]
        stop_ids = list(dict.fromkeys(token for token in stop_ids if token is not None))
        return cls(
            mask_token_id=getattr(text_config, "mask_token_id", None),
            eos_token_id=stop_ids or None,
            pad_token_id=getattr(text_config, "pad_token_id", None),
            bos_token_id=getattr(text_config, "bos_token_id", None),
        )

    @classmethod
    def from_generation_config(cls, config: GenerationConfig, **overrides) -> "DiffusionGenerationConfig":
        """Convert any `GenerationConfig` (e.g. the plain one `from_pretrained` loads) and apply overrides.

        Diffusion fields keep their stored values (`None` included); unset (`None`) base fields fall back to
        the diffusion defaults. In `overrides`, passing `steps` drops `step_ratio` and vice versa, and
        `temperature` or `do_sample` alone replaces the stored pair (`do_sample=False` = greedy; `True` keeps a
        stored temperature). Sampling and search flags the sampler cannot honour are refused (`ValueError`).
        """
        unsupported = sorted(set(overrides) - set(GENERATE_ARGUMENTS))
        if unsupported:
            raise ValueError(
                f"Unsupported generation argument(s) {unsupported} for the masked-diffusion sampler; "
                f"supported: {sorted(GENERATE_ARGUMENTS)}."
            )
        values = {key: value for key, value in config.to_dict().items()
                  if not key.startswith("_") and key != "transformers_version"
                  and (value is not None or key in DIFFUSION_DEFAULTS)}
        inapplicable = sorted(key for key, neutral in INAPPLICABLE_FLAGS.items()
                              if values.get(key, neutral) not in (None, neutral))
        if inapplicable:
            raise ValueError(
                f"The generation config sets {', '.join(f'{key}={values[key]!r}' for key in inapplicable)}, which "
                "the masked-diffusion sampler cannot honour; unset them (diffusion settings: "
                f"{sorted(GENERATE_ARGUMENTS)})."
            )
        if overrides.get("steps") is not None and "step_ratio" not in overrides:
            values["step_ratio"] = None
        if overrides.get("step_ratio") is not None and "steps" not in overrides:
            values["steps"] = None
        if "temperature" in overrides and "do_sample" not in overrides:
            values.pop("do_sample", None)
        if overrides.get("do_sample") is not None and "temperature" not in overrides:
            values["do_sample"] = overrides["do_sample"]
        elif overrides.get("do_sample") is False and _is_number(overrides.get("temperature")) \
                and overrides["temperature"] > 0:
            raise ValueError(f"do_sample=False (greedy) contradicts temperature={overrides['temperature']} "
                             "(sampling): pass one of them.")
        return cls(**{**values, **overrides})

    def validate(self, strict=False, user_set_attributes=None):
        """The base class's checks plus the diffusion settings (`ValueError` on any inconsistency)."""
        super().validate(strict=strict, user_set_attributes=user_set_attributes)
        validate_diffusion_settings(self)


def validate_diffusion_settings(config: DiffusionGenerationConfig) -> None:
    """Raise a `ValueError` naming the field, the value and the fix for any inconsistent setting."""
    length, block = config.max_new_tokens, config.block_length
    if not _is_int(length) or length < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {length!r}.")
    if block is not None:
        if not _is_int(block) or block < 1:
            raise ValueError(f"block_length must be an integer >= 1 or None (one block), got {block!r}.")
        if length % block:
            raise ValueError(
                f"block_length={block} does not divide max_new_tokens={length}; choose a divisor of "
                f"max_new_tokens (e.g. {length}) or leave block_length=None for a single block."
            )
    num_blocks = length // (block or length)
    if config.steps is not None and config.step_ratio is not None:
        raise ValueError(
            f"Pass either steps ({config.steps}) or step_ratio ({config.step_ratio}), not both "
            "(steps = total denoising steps; step_ratio = fraction of block_length per block)."
        )
    if config.steps is not None:
        if not _is_int(config.steps) or config.steps < num_blocks:
            raise ValueError(
                f"steps={config.steps!r} is fewer than the number of blocks ({num_blocks} = max_new_tokens "
                f"{length} / block_length {block}); every block needs at least one step."
            )
        if config.steps % num_blocks:
            raise ValueError(
                f"steps={config.steps} must be a multiple of the number of blocks ({num_blocks}) so that "
                f"every block gets the same number of steps; e.g. steps={config.steps // num_blocks * num_blocks}."
            )
    if config.step_ratio is not None:
        ratio = config.step_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"step_ratio must be a number in (0, 1], got {ratio!r}.")
        if int((block or length) * ratio) < 1:
            raise ValueError(
                f"step_ratio={ratio} gives int({block or length} * {ratio}) = 0 steps per block; "
                f"use step_ratio >= {1 / (block or length):.4g}."
            )
    if config.schedule is not None and config.schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {config.schedule!r}; expected one of {SCHEDULES} (None = 'linear').")
    schedule_kwargs = config.schedule_kwargs or {}
    if not isinstance(schedule_kwargs, dict) or set(schedule_kwargs) - {"shift"}:
        raise ValueError(f"schedule_kwargs must be None or a dict with only the key 'shift', got {schedule_kwargs!r}.")
    shift = schedule_kwargs.get("shift", DEFAULT_SHIFT)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
        raise ValueError(f"schedule_kwargs['shift'] must be a number > 0 (e.g. 3 or 1/3), got {shift!r}.")
    if config.remasking not in REMASKING_STRATEGIES:
        hint = " (the original's spelling 'entrophy' is 'entropy' here)" if config.remasking == "entrophy" else ""
        raise ValueError(f"Unknown remasking {config.remasking!r}; expected one of {REMASKING_STRATEGIES}{hint}.")
    temperature = config.temperature
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature < math.inf):
        raise ValueError(f"temperature must be a finite number >= 0 (0 or None = greedy argmax), got {temperature!r}.")
    if config.mask_token_id is not None and (not _is_int(config.mask_token_id) or config.mask_token_id < 0):
        raise ValueError(f"mask_token_id must be a token id >= 0, got {config.mask_token_id!r}.")
    seeds = config.seed if isinstance(config.seed, (list, tuple)) else [config.seed]
    if not all(_is_int(seed) and seed >= 0 for seed in seeds):
        raise ValueError(f"seed must be an integer >= 0 or a list of them (one per row), got {config.seed!r}.")
    for name in ("stop_at_eos", "use_prefix_cache"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(config, name)!r}.")
    validate_decoding_settings(config)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_decoding_settings(config: DiffusionGenerationConfig) -> None:
    """The checks of `decoding`, `threshold`, `factor` and `max_steps` (`ValueError` naming the fix)."""
    if config.decoding not in DECODING_RULES:
        raise ValueError(f"Unknown decoding {config.decoding!r}; expected one of {DECODING_RULES} "
                         "(\"schedule\" = LaViDa's fixed steps, the default).")
    if not (_is_number(config.threshold) and 0 < config.threshold <= 1):
        raise ValueError(f"threshold must be a number in (0, 1] (e.g. 0.9), got {config.threshold!r}.")
    if not (_is_number(config.factor) and config.factor > 0):
        raise ValueError(f"factor must be a number > 0 (e.g. 1.0), got {config.factor!r}.")
    if config.max_steps is not None and not (_is_int(config.max_steps) and config.max_steps >= 1):
        raise ValueError(f"max_steps must be an integer >= 1 or None (= block_length), got {config.max_steps!r}.")
    if config.decoding != "schedule" and config.remasking not in ADAPTIVE_REMASKING:
        raise ValueError(
            f"decoding={config.decoding!r} compares probabilities, but remasking={config.remasking!r} gives none; "
            f"use remasking in {ADAPTIVE_REMASKING} or decoding='schedule'."
        )


def stop_token_ids(config: DiffusionGenerationConfig) -> list[int]:
    """The stop ids of `stop_at_eos` (`eos_token_id` as a list)."""
    eos = config.eos_token_id
    return [] if eos is None else [eos] if _is_int(eos) else list(eos)


# ----------------------------------------------------------------------------------------------------------
# One denoising step: propose tokens, score them, write the most confident ones
# ----------------------------------------------------------------------------------------------------------


@dataclass
class DiffusionGenerationOutput(ModelOutput):
    """What `generate(..., return_dict_in_generate=True)` returns.

    Args:
        sequences (`torch.LongTensor` of shape `[B, max_new_tokens]`): the answer ids (no prompt).
        history (`torch.LongTensor` of shape `[num_steps_run, B, max_new_tokens]`): the answer after every
            denoising step that ran (mask ids where still masked), for visualisation.
        num_forward_passes (`int`): model calls, the prefix encoding included (1 + steps with the cache).
        num_saved_steps (`int`): planned steps (blocks x steps per block; `max_steps` per block for the
            adaptive rules) that ran no forward pass: every row had finished (`stop_at_eos`), the block had no
            mask left, or the schedule gave it no token.
        num_forward_passes_per_row (`torch.LongTensor` of shape `[B]`): the forward passes each row took part
            in, the prefix encoding included (a row leaves the batch once it has nothing left to decode).
        tokens_per_forward (`torch.FloatTensor` of shape `[B]`): tokens each row decoded per denoising pass
            it took part in (the prefix encoding, which decodes nothing, not counted; pad filled in after a
            stop token not counted).
    """

    sequences: torch.LongTensor | None = None
    history: torch.LongTensor | None = None
    num_forward_passes: int | None = None
    num_saved_steps: int | None = None
    num_forward_passes_per_row: torch.LongTensor | None = None
    tokens_per_forward: torch.FloatTensor | None = None


def propose_tokens(logits: torch.Tensor, temperature: float | None,
                   uniform: torch.Tensor | None = None) -> torch.Tensor:
    """x0 per position: argmax, or Gumbel-max `exp(l) / (-log u)^T` in float64 with `uniform` u.  # [..., V] -> [...]

    Nothing is suppressed: the mask id itself may win (kept from the original).
    """
    if not temperature:
        return logits.argmax(dim=-1)
    return (logits.to(torch.float64).exp() / (-torch.log(uniform)) ** temperature).argmax(dim=-1)


def token_confidence(logits: torch.Tensor, x0: torch.Tensor, remasking: str,
                     generator: torch.Generator | None) -> torch.Tensor:
    """float64 score per position (higher = written first).  # [..., V], [...] -> [...]

    Computed from the noise-free logits, as in the original; "random" draws from `generator`.
    """
    if remasking == "random":
        return torch.rand(x0.shape, generator=generator, dtype=torch.float64, device=x0.device)
    probs = torch.softmax(logits.to(torch.float64), dim=-1)  # [..., V]
    if remasking == "low_confidence":
        return probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    if remasking == "margin":
        top2 = probs.topk(2, dim=-1).values  # [..., 2]
        return top2[..., 0] - top2[..., 1]
    return (probs * torch.log(probs + 1e-10)).sum(dim=-1)  # "entropy": negative entropy


def first_true(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the first `count` True entries along the last dim, in order, without a host sync."""
    return mask.to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices[..., :count]


def row_noise(generators: list, sizes: list[int], vocab_size: int, config, device):
    """Each row's noise from its own generator, drawn as the original draws it (Gumbel uniforms [C, V], then
    "random" scores [C]), padded to `[b, max(sizes), V]` / `[b, max(sizes)]` (None where unused).

    The one per-row loop of the sampler: a row's seeded stream must not depend on the other rows.
    """
    width = max(sizes)
    uniform = torch.full((len(sizes), width, vocab_size), 0.5, dtype=torch.float64, device=device) \
        if config.temperature else None
    scores = torch.zeros((len(sizes), width), dtype=torch.float64, device=device) \
        if config.remasking == "random" else None
    for index, (generator, size) in enumerate(zip(generators, sizes)):
        if uniform is not None:
            uniform[index, :size] = torch.rand((size, vocab_size), generator=generator, dtype=torch.float64,
                                               device=device)
        if scores is not None:
            scores[index, :size] = torch.rand((size,), generator=generator, dtype=torch.float64, device=device)
    return uniform, scores


def choose_writes(confidence: torch.Tensor, num_candidates: torch.Tensor, count: int | None, last_step: bool,
                  config) -> torch.Tensor:
    """Positions a step writes.  # [b, L] float64 (-inf off the candidates), [b] -> [b, L] bool

    `decoding="schedule"`: the `count` best (fewer when a row has fewer candidates), through the original's
    `topk`. Adaptive rules: the best candidates passing the threshold / factor rule, at least one, all of them
    on a block's last allowed step.
    """
    written = torch.zeros_like(confidence, dtype=torch.bool)  # [b, L]
    if config.decoding == "schedule":
        chosen = confidence.topk(min(count, confidence.shape[-1]), dim=-1).indices  # [b, k]
        return written.scatter(-1, chosen, confidence.gather(-1, chosen) > -math.inf)
    ranked, order = confidence.sort(dim=-1, descending=True, stable=True)  # [b, L] best first
    rank = torch.arange(confidence.shape[-1], device=confidence.device)  # [L]
    if last_step:
        take = torch.ones_like(written)
    elif config.decoding == "threshold":
        take = ranked >= config.threshold
    else:  # "factor": the n best while (n + 1)(1 - c_n) < f, n = rank + 1
        take = ((rank + 2) * (1 - ranked) < config.factor).long().cumprod(dim=-1).bool()
    take = (take | (rank == 0)) & (rank < num_candidates[:, None])  # [b, L]
    return written.scatter(-1, order, take)


def denoising_step(logits: torch.Tensor, answer: torch.Tensor, candidate: torch.Tensor, sizes: list[int],
                   count: int | None, last_step: bool, config, generators: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Propose, score and write for every row at once; returns the new answers and tokens decoded per row.

    logits [b, L, V], answer [b, L], candidate [b, L] bool (masked positions up to the block end),
    sizes: candidates per row (host ints, >= 1). Only the candidates' logits are scored.
    """
    width, vocab_size = max(sizes), logits.shape[-1]
    positions = first_true(candidate, width)  # [b, C]
    valid = candidate.gather(-1, positions)  # [b, C]: the first sizes[row] slots of each row
    flat_positions = positions + torch.arange(len(sizes), device=logits.device)[:, None] * logits.shape[1]  # [b, C]
    candidate_logits = logits.flatten(0, 1).index_select(0, flat_positions.flatten()).view(
        len(sizes), width, vocab_size)  # [b, C, V]
    uniform, scores = row_noise(generators, sizes, vocab_size, config, logits.device)
    x0 = propose_tokens(candidate_logits, config.temperature, uniform)  # [b, C]
    score = scores if scores is not None else token_confidence(candidate_logits, x0, config.remasking, None)
    confidence = torch.full(answer.shape, -math.inf, dtype=torch.float64, device=answer.device)  # [b, L]
    confidence.scatter_(-1, positions, score.masked_fill(~valid, -math.inf))
    written = choose_writes(confidence, valid.sum(dim=-1), count, last_step, config)  # [b, L]
    proposal = answer.scatter(-1, positions, x0)  # [b, L]
    decoded = (written & (proposal != config.mask_token_id)).sum(dim=-1)  # [b]
    return torch.where(written, proposal, answer), decoded


def finish_rows(answer: torch.Tensor, finished: torch.Tensor, mask_token_id: int, stop_ids: torch.Tensor,
                pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mark rows decoded up to and including a stop token as finished; pad them after their first stop token.

    [B, L], [B] -> [B, L], [B]
    """
    is_stop = torch.isin(answer, stop_ids)  # [B, L]
    decoded_prefix = (answer != mask_token_id).long().cumprod(dim=-1).bool()  # [B, L]
    newly_finished = (is_stop & decoded_prefix).any(dim=-1) & ~finished  # [B]
    after_first_stop = is_stop.long().cumsum(dim=-1) - is_stop.long() > 0  # [B, L]
    answer = answer.masked_fill(newly_finished[:, None] & after_first_stop, pad_token_id)
    return answer, finished | newly_finished


# ----------------------------------------------------------------------------------------------------------
# Input checks and the denoiser (cached or full forward)
# ----------------------------------------------------------------------------------------------------------


def _text_config(model):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def resolve_generation_config(model, generation_config: GenerationConfig | None = None,
                              **overrides) -> DiffusionGenerationConfig:
    """Model defaults <- `generation_config` (replaces the model's when given) <- per-call overrides.

    Missing special ids (mask, stop, pad) come from the model config; the mask id is never hard-coded.
    """
    base = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    if base is None:
        base = DiffusionGenerationConfig.from_model_config(model.config)
    if not isinstance(base, GenerationConfig):
        raise ValueError(f"generation_config must be a GenerationConfig, got {type(base).__name__}.")
    config = DiffusionGenerationConfig.from_generation_config(base, **overrides)
    model_defaults = DiffusionGenerationConfig.from_model_config(model.config)
    for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, name) is None:
            setattr(config, name, getattr(model_defaults, name))
    if config.mask_token_id is None:
        raise ValueError("No mask_token_id: set it in the model config (text config) or the generation config.")
    if config.stop_at_eos and (not stop_token_ids(config) or config.pad_token_id is None):
        raise ValueError("stop_at_eos=True needs eos_token_id (stop ids) and pad_token_id (filler) to be set.")
    return config


def _check_inputs(model, config: DiffusionGenerationConfig, input_ids, inputs_embeds, attention_mask) -> None:
    """Validate the prefix before any compute."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids [B, P] or inputs_embeds [B, P, D] (the prefix).")
    prefix = input_ids if input_ids is not None else inputs_embeds
    if input_ids is not None and (input_ids.dim() != 2 or input_ids.dtype.is_floating_point):
        raise ValueError(f"input_ids must be an integer tensor [B, P], got {tuple(input_ids.shape)} {input_ids.dtype}.")
    text_config = _text_config(model)
    if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != text_config.hidden_size):
        raise ValueError(
            f"inputs_embeds must be [B, P, hidden_size={text_config.hidden_size}], got {tuple(inputs_embeds.shape)}."
        )
    batch_size, prefix_length = prefix.shape[:2]
    if prefix_length < 1:
        raise ValueError("The prefix is empty: pass at least one prompt token per row.")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch_size, prefix_length):
            raise ValueError(
                f"attention_mask must have the prefix's shape {(batch_size, prefix_length)}, "
                f"got {tuple(attention_mask.shape)}."
            )
        if not bool((attention_mask != 0).any(dim=-1).all()):
            raise ValueError("attention_mask has a row without any real token; every row needs a prompt.")
    total = prefix_length + config.max_new_tokens
    if total > text_config.max_position_embeddings:
        raise ValueError(
            f"prefix length {prefix_length} + max_new_tokens {config.max_new_tokens} = {total} exceeds the "
            f"model's max_position_embeddings={text_config.max_position_embeddings}; shorten the prompt or "
            "lower max_new_tokens."
        )
    if isinstance(config.seed, (list, tuple)) and len(config.seed) != batch_size:
        raise ValueError(f"seed has {len(config.seed)} entries but the batch has {batch_size} rows.")


class Denoiser:
    """`denoiser(answer [b, L], rows, index) -> logits [b, L, V]` for the prefix rows `rows` (a tuple of row
    indices; `index` holds them on the device, or is `slice(None)` for all rows).

    With the cache the prefix is encoded once (`prefix_passes` = 1); a subset of rows runs against that cache's
    rows (`cache.select_rows`, re-selected only when the subset changes). Without it every step re-runs
    `[prefix; answer]` (the original's prefix_lm=False). FIX: any batch size, padding honoured, only the answer
    returned (the original: batch 1, unmasked, prompt positions returned as placeholder zeros).
    """

    def __init__(self, model, input_ids, inputs_embeds, attention_mask, use_prefix_cache: bool):
        self.model, self.input_ids, self.inputs_embeds, self.attention_mask = \
            model, input_ids, inputs_embeds, attention_mask
        prefix = input_ids if input_ids is not None else inputs_embeds
        self.all_rows = tuple(range(prefix.shape[0]))
        self.cache = None
        if use_prefix_cache:
            self.cache = model.encode_prefix(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                             attention_mask=attention_mask)
        self.prefix_passes = int(use_prefix_cache)
        self._selected = (self.all_rows, self.cache)

    def __call__(self, answer: torch.Tensor, rows: tuple, index) -> torch.Tensor:
        if self.cache is not None:
            if rows != self._selected[0]:  # rows left the batch: their cache rows too
                self._selected = (rows, self.cache if rows == self.all_rows else self.cache.select_rows(index))
            return self.model(input_ids=answer, cache=self._selected[1]).logits
        attention_mask = None if self.attention_mask is None else self.attention_mask[index]
        full_mask = None if attention_mask is None else torch.cat(
            [attention_mask, attention_mask.new_ones(answer.shape)], dim=1)  # [b, P + L]
        length = answer.shape[1]  # LM head on the answer positions only (same numbers, less work)
        if self.input_ids is not None:
            full_ids = torch.cat([self.input_ids[index], answer], dim=1)  # [b, P + L]
            return self.model(input_ids=full_ids, attention_mask=full_mask, logits_to_keep=length).logits
        prefix_embeds = self.inputs_embeds[index]  # [b, P, D]
        answer_embeds = self.model.get_input_embeddings()(answer).to(prefix_embeds.dtype)  # [b, L, D]
        full_embeds = torch.cat([prefix_embeds, answer_embeds], dim=1)  # [b, P + L, D]
        return self.model(inputs_embeds=full_embeds, attention_mask=full_mask, logits_to_keep=length).logits


def _row_generators(config: DiffusionGenerationConfig, batch_size: int, device) -> list[torch.Generator | None]:
    """One seeded generator per row when anything is random, else `None`s."""
    if not config.temperature and config.remasking != "random":
        return [None] * batch_size
    if isinstance(config.seed, (list, tuple)):
        seeds = list(config.seed)
    else:
        seeds = [config.seed + row for row in range(batch_size)]
    return [torch.Generator(device=device).manual_seed(seed) for seed in seeds]


# ----------------------------------------------------------------------------------------------------------
# The sampling loop
# ----------------------------------------------------------------------------------------------------------


class StablePrefixStreamer:
    """Feeds a transformers streamer (`TextStreamer`, `TextIteratorStreamer`, any `BaseStreamer`) as diffusion
    decodes: positions are written out of order, so each `put` sends the tokens that extend the leftmost
    contiguous run of decoded positions (final, since decoded tokens are never re-masked)."""

    def __init__(self, streamer, prompt_ids: torch.LongTensor | None, mask_token_id: int):
        self.streamer, self.mask_token_id, self.sent = streamer, mask_token_id, 0
        if prompt_ids is not None:  # as transformers' generate: the prompt first (`skip_prompt` drops it)
            streamer.put(prompt_ids.cpu())

    def update(self, answer: torch.LongTensor) -> None:
        """Send the newly stable tokens of `answer` [1, L]."""
        masked = (answer[0] == self.mask_token_id).nonzero()
        stable = int(masked[0]) if len(masked) else answer.shape[1]
        if stable > self.sent:
            self.streamer.put(answer[0, self.sent:stable].cpu())
            self.sent = stable

    def end(self, answer: torch.LongTensor) -> None:
        self.update(answer)
        self.streamer.end()


@torch.no_grad()
def diffusion_generate(model, input_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
                       streamer=None, prompt_ids: torch.LongTensor | None = None,
                       **kwargs) -> torch.LongTensor | DiffusionGenerationOutput:
    """Generate `max_new_tokens` answer ids for a prefix given as `input_ids` [B, P] or `inputs_embeds` [B, P, D].

    `attention_mask` [B, P] marks padding (left or right). `kwargs` override fields of the generation config
    (see `DiffusionGenerationConfig`). `streamer` (batch size 1) receives the prompt ids (`input_ids`, or
    `prompt_ids` with `inputs_embeds`), then each newly stable prefix of the answer (`StablePrefixStreamer`),
    then `end()`. Returns the answer ids [B, max_new_tokens], or a `DiffusionGenerationOutput` when
    `return_dict_in_generate=True`. All arguments are validated before any forward pass.
    """
    config = resolve_generation_config(model, generation_config, **kwargs)
    _check_inputs(model, config, input_ids, inputs_embeds, attention_mask)
    if streamer is not None and (input_ids if input_ids is not None else inputs_embeds).shape[0] != 1:
        raise ValueError("A streamer takes one sequence: pass a batch of one row when streaming.")
    prefix = input_ids if input_ids is not None else inputs_embeds
    batch_size, device = prefix.shape[0], prefix.device
    mask_id, length = config.mask_token_id, config.max_new_tokens
    block_length = config.block_length or length
    if config.decoding == "schedule":
        # Every block starts fully masked, so all blocks (and rows) share one schedule (<= block_steps entries).
        block_steps = steps_per_block(length, config.block_length, config.steps, config.step_ratio)
        plan = transfer_schedule(block_length, block_steps, config.schedule, config.schedule_kwargs)
    else:  # adaptive: each step's count comes from the scores; a block runs until it is decoded
        block_steps = config.max_steps or block_length
        plan = [None] * block_steps
    stop_ids = torch.tensor(stop_token_ids(config), dtype=torch.long, device=device)
    generators = _row_generators(config, batch_size, device)

    denoiser = Denoiser(model, input_ids, inputs_embeds, attention_mask, config.use_prefix_cache)
    answer = torch.full((batch_size, length), mask_id, dtype=torch.long, device=device)  # [B, L]
    stream = None if streamer is None else StablePrefixStreamer(
        streamer, input_ids if input_ids is not None else prompt_ids, mask_id)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)  # [B]
    passes = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B] denoising passes per row
    decoded = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B] tokens decoded per row
    history, steps_run = [], 0
    for block_end in range(block_length, length + 1, block_length):
        # Candidates: masked positions up to the end of the current block (later blocks wait, decoded tokens
        # are final). A row decodes while its current block has a mask and it has not finished.
        in_reach = torch.arange(length, device=device) < block_end  # [L]
        for step, count in enumerate(plan):
            if count == 0:
                continue  # the schedule gives this step no token: no forward pass
            candidate = (answer == mask_id) & in_reach & ~finished[:, None]  # [B, L]
            active = candidate[:, block_end - block_length:block_end].any(dim=-1)  # [B]
            sizes = (candidate.sum(dim=-1) * active).tolist()  # the step's one host synchronisation
            rows = tuple(row for row, size in enumerate(sizes) if size)
            if not rows:
                break  # nothing left to decode in this block (the original skips exhausted blocks too)
            index = slice(None) if len(rows) == batch_size else first_true(active, len(rows))
            logits = denoiser(answer[index], rows, index)  # [b, L, V]: rows with nothing to decode are left out
            answer[index], decoded_now = denoising_step(
                logits, answer[index], candidate[index], [sizes[row] for row in rows], count,
                step == len(plan) - 1, config, [generators[row] for row in rows])
            passes += active
            decoded[index] += decoded_now
            steps_run += 1
            if config.stop_at_eos:
                answer, finished = finish_rows(answer, finished, mask_id, stop_ids, config.pad_token_id)
            if config.return_dict_in_generate:
                history.append(answer.clone())
            if stream is not None:
                stream.update(answer)

    if stream is not None:
        stream.end(answer)
    if not config.return_dict_in_generate:
        return answer
    return DiffusionGenerationOutput(
        sequences=answer,
        history=torch.stack(history) if history else answer.new_empty((0, batch_size, length)),
        num_forward_passes=denoiser.prefix_passes + steps_run,
        num_saved_steps=length // block_length * block_steps - steps_run,
        num_forward_passes_per_row=passes + denoiser.prefix_passes,
        tokens_per_forward=decoded.double().div(passes.clamp(min=1)).float(),
    )


__all__ = [
    "DiffusionGenerationConfig",
    "DECODING_RULES",
    "DiffusionGenerationOutput",
    "REMASKING_STRATEGIES",
    "SCHEDULES",
    "StablePrefixStreamer",
    "diffusion_generate",
    "get_named_schedule_tokens",
    "get_num_transfer_tokens",
    "resolve_generation_config",
    "steps_per_block",
    "transfer_schedule",
]
