"""Token-exact parity of `generate()` with the original LaViDa sampler (golden case d: g1-g9).

The kwargs of every case are read from `lm_cases.json` and translated to our argument names: the original
ignores `steps`, defaults to `schedule=None` (our "linear") and no `step_ratio`, and `prefix_lm` is our
`use_prefix_cache`. Its non-cached path (g9) returns 20 placeholder zeros before the answer; we return the
answer only (REFERENCE quirk 19).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from shirg_hf import LladaConfig, LladaForMaskedDiffusion
from shirg_hf.conversion import rename_lavida_state_dict

from conftest import GOLDEN_LOGITS_TOLERANCE


@pytest.fixture(scope="module")
def golden(golden_dir):
    cases = json.loads((golden_dir / "lm_cases.json").read_text())
    tensors = load_file(golden_dir / "lm_cases.safetensors")
    original_config = json.loads((golden_dir / "lm_tiny_config.json").read_text())["llada_model_config"]
    # The tiny vocabulary has no BOS/EOT ids: drop the LLaDA-8B defaults that do not fit it.
    config = LladaConfig.from_lavida_config(original_config)
    model = LladaForMaskedDiffusion(config).eval()
    state_dict = rename_lavida_state_dict(load_file(golden_dir / "lm_tiny.safetensors"), config)
    model.load_state_dict(state_dict, strict=True)
    return cases, tensors, model


def generate_kwargs(case_kwargs: dict) -> dict:
    """Our generate() arguments for the original's kwargs (its defaults made explicit)."""
    return dict(
        max_new_tokens=case_kwargs["max_new_tokens"],
        block_length=case_kwargs["block_length"],
        step_ratio=case_kwargs.get("step_ratio"),
        schedule=case_kwargs.get("schedule") or "linear",
        use_prefix_cache=case_kwargs.get("prefix_lm", True),
        temperature=0.0,
        remasking="low_confidence",
        return_dict_in_generate=True,
    )


GOLDEN_CASES = [
    "g1_n16_b16_default",
    "g2_n16_b8_default",
    "g3_n16_b16_ratio0.5",
    "g4_n16_b16_ratio0.5_shift",
    "g5_n16_b16_shift",
    "g6_n16_b8_ratio0.5_cosine",
    "g7_n32_b32_ratio0.25_shift",
    "g8_n16_b8_ratio0.5_shift",
    "g9_noprefixlm_n16_b8_ratio0.5_shift",
]


def test_golden_case_list_is_complete(golden):
    cases, _, _ = golden
    assert sorted(cases["generation"]) == sorted(GOLDEN_CASES)
    assert cases["generation_common_kwargs"]["mask_id"] == 511
    assert cases["generation_common_kwargs"]["temperature"] == 0.0
    assert cases["generation_common_kwargs"]["remasking"] == "low_confidence"


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_generation_matches_the_original_token_for_token(golden, name):
    cases, tensors, model = golden
    case = cases["generation"][name]
    case_kwargs = dict(case["kwargs"])
    prefix = tensors["d_prefix_embeds"]  # [2, 20, 64]
    if case_kwargs.get("inputs_embeds") == "d_prefix_embeds[:1]":
        prefix = prefix[:1]
    length = case_kwargs["max_new_tokens"]
    expected_ids = tensors[f"d_{name}_output_ids"][:, -length:]  # g9: drop the original's placeholder zeros
    expected_history = tensors[f"d_{name}_history"][..., -length:]  # [steps, B, L]

    calls = []
    handle = model.model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        output = model.generate(inputs_embeds=prefix, **generate_kwargs(case_kwargs))
    finally:
        handle.remove()

    assert model.generation_config.mask_token_id == 511  # from the config, as the original was told explicitly
    assert torch.equal(output.sequences, expected_ids)
    assert torch.equal(output.history, expected_history)  # every intermediate state, step by step
    assert output.num_forward_passes == len(calls) == case["n_model_calls"]
    assert output.num_saved_steps == 0


def test_g4_logits_of_every_denoising_step(golden):
    """The logits behind each decision, step by step (g4, the predict.py setting)."""
    cases, tensors, model = golden
    name = "g4_n16_b16_ratio0.5_shift"
    step_logits = []
    handle = model.register_forward_hook(lambda module, args, output: step_logits.append(output.logits))
    try:
        model.generate(inputs_embeds=tensors["d_prefix_embeds"], **generate_kwargs(cases["generation"][name]["kwargs"]))
    finally:
        handle.remove()
    expected = tensors[f"d_{name}_step_logits"]  # [8, 2, 16, 512]
    assert len(step_logits) == expected.shape[0]  # encode_prefix runs the backbone only, no LM head
    torch.testing.assert_close(torch.stack(step_logits), expected, **GOLDEN_LOGITS_TOLERANCE)


def test_golden_prefix_in_a_left_padded_batch_gives_the_same_tokens(golden):
    """FIX (REFERENCE section 6): a padded batch row equals the row alone; g8 settings."""
    cases, tensors, model = golden
    name = "g8_n16_b8_ratio0.5_shift"
    prefix = tensors["d_prefix_embeds"]  # [2, 20, 64]
    short = prefix[1:, 6:]  # row 1 without its first 6 positions: a 14-token prompt
    batch = torch.cat([prefix[:1], torch.cat([torch.zeros(1, 6, 64), short], dim=1)])  # left padding
    attention_mask = torch.ones(2, 20, dtype=torch.long)
    attention_mask[1, :6] = 0
    kwargs = generate_kwargs(cases["generation"][name]["kwargs"])
    batched = model.generate(inputs_embeds=batch, attention_mask=attention_mask, **kwargs).sequences
    assert torch.equal(batched[0], tensors[f"d_{name}_output_ids"][0])
    assert torch.equal(batched[1], model.generate(inputs_embeds=short, **kwargs).sequences[0])
