"""Transfer schedules, step counts and `DiffusionGenerationConfig` (no model needed)."""

import json

import pytest
from transformers import GenerationConfig

from shirg_hf import DiffusionGenerationConfig, LladaConfig
from shirg_hf.modeling.generation_diffusion import (
    SCHEDULES,
    get_num_transfer_tokens,
    steps_per_block,
    transfer_schedule,
)

# Golden table key -> (our schedule name, schedule_kwargs). The original's `schedule=None` is our "linear";
# its table "linear" is an unrecognised name, i.e. sigma(t) = t through the named-schedule rounding.
GOLDEN_SCHEDULE_NAMES = {
    "None": ("linear", None),
    "shift": ("shift", None),
    "shift_2": ("shift", {"shift": 2}),
    "cosine": ("cosine", None),
    "logit_normal": ("logit_normal", None),
    "linear": ("linear_sigma", None),
}


def test_golden_transfer_schedule_tables(golden_dir):
    tables = json.loads((golden_dir / "lm_cases.json").read_text())["num_transfer_tokens_schedules"]
    assert set(tables) == set(GOLDEN_SCHEDULE_NAMES)
    for key, table in tables.items():
        schedule, schedule_kwargs = GOLDEN_SCHEDULE_NAMES[key]
        assert table["schedule_kwargs"] == schedule_kwargs
        assert len(table["rows"]) == 14
        for row in table["rows"]:
            counts = transfer_schedule(row["mask_count"], row["steps"], schedule, schedule_kwargs)
            assert counts == row["num_transfer_tokens"], (key, row["mask_count"], row["steps"])


def test_linear_and_linear_sigma_spread_remainders_differently():
    # REFERENCE.md section 6: none -> [3, 3, 2, 2]; an unrecognised name (sigma = t) -> [3, 2, 3, 2].
    assert transfer_schedule(10, 4, "linear") == [3, 3, 2, 2]
    assert transfer_schedule(10, 4, None) == [3, 3, 2, 2]
    assert transfer_schedule(10, 4, "linear_sigma") == [3, 2, 3, 2]
    # LLaDA's equal split is not capped: surplus steps get zero tokens.
    assert get_num_transfer_tokens(5, 8) == [1, 1, 1, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("mask_count,steps", [(1, 1), (7, 3), (16, 16), (32, 7), (64, 32), (100, 30), (5, 8)])
def test_every_schedule_writes_every_mask_once(schedule, mask_count, steps):
    counts = transfer_schedule(mask_count, steps, schedule, {"shift": 1 / 3} if schedule == "shift" else None)
    assert sum(counts) == mask_count
    assert len(counts) <= steps
    if schedule != "linear":  # named schedules: capped at mask_count steps, at least one token per step
        assert len(counts) == min(steps, mask_count) and min(counts) >= 1


def test_shift_decodes_few_tokens_first_for_s_above_one_and_many_for_s_below():
    # LAVIDA-SPEC 7.4 table, (32, 8): s = 3 -> 2,2,2,2,4,4,7,9 ; s = 1/3 -> 10,6,5,3,3,2,2,1.
    assert transfer_schedule(32, 8, "shift") == [2, 2, 2, 2, 4, 4, 7, 9]
    assert transfer_schedule(32, 8, "shift", {"shift": 1 / 3}) == [10, 6, 5, 3, 3, 2, 2, 1]


def test_unknown_schedule_name_is_rejected():
    with pytest.raises(ValueError, match="Unknown schedule 'square'"):
        transfer_schedule(16, 4, "square")


def test_steps_per_block_rules():
    # The original's rule: block_length steps per block, times step_ratio (truncated).
    assert steps_per_block(16, 16, None, None) == 16
    assert steps_per_block(16, 8, None, None) == 8
    assert steps_per_block(16, 16, None, 0.5) == 8
    assert steps_per_block(32, 32, None, 0.25) == 8
    assert steps_per_block(64, None, None, 0.5) == 32
    assert steps_per_block(10, 10, None, 0.35) == 3
    # `steps` = LLaDA's total over all blocks.
    assert steps_per_block(64, 16, 32, None) == 8
    assert steps_per_block(16, None, 5, None) == 5


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(max_new_tokens=16, block_length=5), "block_length=5 does not divide max_new_tokens=16"),
        (dict(max_new_tokens=16, block_length=4, steps=3, step_ratio=None), "fewer than the number of blocks"),
        (dict(max_new_tokens=16, block_length=4, steps=6, step_ratio=None), "multiple of the number of blocks"),
        (dict(steps=8, step_ratio=0.5), "not both"),
        (dict(step_ratio=1.5), r"step_ratio must be a number in \(0, 1\]"),
        (dict(max_new_tokens=16, step_ratio=0.05), "gives int"),
        (dict(schedule="square"), "Unknown schedule 'square'"),
        (dict(schedule_kwargs={"alpha": 2}), "only the key 'shift'"),
        (dict(schedule_kwargs={"shift": 0}), "must be a number > 0"),
        (dict(remasking="entrophy"), "Unknown remasking 'entrophy'.*'entropy' here"),
        (dict(remasking="top_p"), "Unknown remasking"),
        (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(seed=-1), "seed must be"),
        (dict(stop_at_eos="yes"), "stop_at_eos must be True or False"),
    ],
)
def test_bad_settings_raise_value_error(settings, message):
    with pytest.raises(ValueError, match=message):
        DiffusionGenerationConfig(**settings)


def test_defaults_are_the_released_demo_settings_with_greedy_decoding():
    config = DiffusionGenerationConfig()
    assert (config.max_new_tokens, config.block_length, config.step_ratio, config.steps) == (64, None, 0.5, None)
    assert (config.schedule, config.remasking, config.use_prefix_cache, config.stop_at_eos) == (
        "shift", "low_confidence", True, False)
    assert config.temperature is None and config.do_sample is None  # greedy
    sampling = DiffusionGenerationConfig(temperature=0.1)
    assert sampling.temperature == 0.1 and sampling.do_sample is True


def test_from_model_config_takes_special_ids_from_the_model():
    config = DiffusionGenerationConfig.from_model_config(LladaConfig.tiny(mask_token_id=300))
    assert config.mask_token_id == 300
    assert config.eos_token_id == [503, 510]  # EOT then EOS: both end an answer
    assert config.pad_token_id == 510


def test_save_and_load_round_trip(tmp_path):
    config = DiffusionGenerationConfig(
        max_new_tokens=32, block_length=16, steps=8, step_ratio=None, schedule="shift",
        schedule_kwargs={"shift": 1 / 3}, remasking="margin", temperature=0.7, seed=[3, 4], stop_at_eos=True,
        use_prefix_cache=False, mask_token_id=511, eos_token_id=[503, 510], pad_token_id=510,
    )
    config.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "generation_config.json").read_text())
    assert stored["schedule_kwargs"] == {"shift": 1 / 3} and stored["step_ratio"] is None
    assert DiffusionGenerationConfig.from_pretrained(tmp_path) == config
    # `from_pretrained` of a model loads a plain GenerationConfig: the diffusion keys survive the conversion.
    plain = GenerationConfig.from_pretrained(tmp_path)
    assert DiffusionGenerationConfig.from_generation_config(plain) == config


def test_call_overrides_steps_and_step_ratio_are_exclusive():
    base = DiffusionGenerationConfig(max_new_tokens=16, step_ratio=0.5)
    with_steps = DiffusionGenerationConfig.from_generation_config(base, steps=4)
    assert (with_steps.steps, with_steps.step_ratio) == (4, None)
    with_ratio = DiffusionGenerationConfig.from_generation_config(with_steps, step_ratio=0.25)
    assert (with_ratio.steps, with_ratio.step_ratio) == (None, 0.25)
    # Unset base fields of a plain GenerationConfig fall back to the diffusion defaults.
    plain = DiffusionGenerationConfig.from_generation_config(GenerationConfig(), block_length=8)
    assert (plain.max_new_tokens, plain.block_length, plain.schedule) == (64, 8, "shift")


def test_unsupported_generate_arguments_are_rejected():
    with pytest.raises(ValueError, match=r"Unsupported generation argument\(s\) \['num_beams', 'top_p'\]"):
        DiffusionGenerationConfig.from_generation_config(DiffusionGenerationConfig(), num_beams=4, top_p=0.9)


def test_unit_linspace_rounds_like_the_fma_kernel_on_every_cpu():
    """t = 1 - step * 15 for 31 points is rounded once (0.49999997, as the golden tables need), not twice (0.5)."""
    import torch

    from shirg_hf.modeling.generation_diffusion import unit_linspace

    t = unit_linspace(31)
    assert t.dtype == torch.float32 and t[0] == 0 and t[-1] == 1
    assert t[15] == torch.nextafter(torch.tensor(0.5), torch.tensor(0.0))
    assert torch.equal(t[:15], torch.tensor(1 / 30, dtype=torch.float32) * torch.arange(15, dtype=torch.float32))
