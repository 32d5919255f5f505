"""Parity with the ORIGINAL LaViDa LLaDA code on its golden outputs (cases a, b, c of `lm_cases.json`).

The folder comes from `--golden-dir` (default ../shared/golden); every size, id and shape is read from its JSON
files and the weights are loaded through the checkpoint key mapping of `shirg_hf.conversion`. Skipped with a
reason when the folder is absent.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from shirg_hf import LladaConfig, LladaForMaskedDiffusion, prefix_dlm_attention_mask
from shirg_hf.conversion import rename_lavida_state_dict

from conftest import GOLDEN_LOGITS_TOLERANCE, assert_fp32_close, llada_reduction_length


@pytest.fixture(scope="module")
def golden(golden_dir):
    cases_json = json.loads((golden_dir / "lm_cases.json").read_text())
    return {
        "config": json.loads((golden_dir / "lm_tiny_config.json").read_text())["llada_model_config"],
        "shapes": {name: tuple(spec["shape"]) for name, spec in cases_json["tensors"].items()},
        "tensors": load_file(golden_dir / "lm_cases.safetensors"),
        "weights": load_file(golden_dir / "lm_tiny.safetensors"),
    }


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(golden, request):
    config = LladaConfig.from_lavida_config(golden["config"])
    model = LladaForMaskedDiffusion(config).eval()
    model.load_state_dict(rename_lavida_state_dict(golden["weights"], config), strict=True)
    model.set_attn_implementation(request.param)
    return model


def assert_golden(actual, golden, name):
    expected = golden["tensors"][name]
    assert tuple(actual.shape) == golden["shapes"][name]
    torch.testing.assert_close(actual, expected, **GOLDEN_LOGITS_TOLERANCE, msg=lambda m: f"{name}: {m}")


def test_config_sizes_come_from_the_golden_config(golden, model):
    raw = golden["config"]
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        raw["d_model"], raw["n_layers"], raw["n_heads"])
    assert config.vocab_size == (raw.get("embedding_size") or raw["vocab_size"])
    assert config.mask_token_id == raw["mask_token_id"]
    assert config.rope_theta == raw["rope_theta"] and config.rms_norm_eps == raw["rms_norm_eps"]


def test_case_a_logits_and_hidden_states_from_ids(golden, model):
    tensors = golden["tensors"]
    with torch.no_grad():
        outputs = model(input_ids=tensors["a_input_ids"], output_hidden_states=True)
    assert_golden(outputs.logits, golden, "a_logits")
    hidden_names = sorted(name for name in golden["shapes"] if name.startswith("a_hidden_state_"))
    assert len(hidden_names) == len(outputs.hidden_states) == model.config.num_hidden_layers + 1
    for index, hidden_state in enumerate(outputs.hidden_states):
        assert_golden(hidden_state, golden, f"a_hidden_state_{index}")


def test_case_b_logits_from_embeddings(golden, model):
    with torch.no_grad():
        logits = model(inputs_embeds=golden["tensors"]["b_inputs_embeds"]).logits
    assert_golden(logits, golden, "b_logits")


def test_case_c_prefix_cache_path(golden, model):
    tensors = golden["tensors"]
    prefix_embeds, suffix_ids = tensors["c_prefix_embeds"], tensors["c_suffix_ids"]
    prefix_length = prefix_embeds.shape[1]
    with torch.no_grad():
        cache = model.encode_prefix(inputs_embeds=prefix_embeds)
        cached = model(input_ids=suffix_ids, cache=cache).logits
        repeated = model(input_ids=suffix_ids, cache=cache).logits
        full_embeds = torch.cat([prefix_embeds, model.get_input_embeddings()(suffix_ids)], dim=1)
        prefix_dlm = prefix_dlm_attention_mask(torch.ones(full_embeds.shape[:2]), prefix_lengths=prefix_length)
        prefix_dlm_suffix = model(inputs_embeds=full_embeds, attention_mask=prefix_dlm).logits[:, prefix_length:]
        full_pass = model(inputs_embeds=full_embeds).logits
        prefix_only = model(inputs_embeds=prefix_embeds).logits
    assert_golden(cached, golden, "c_suffix_logits_cached")
    assert torch.equal(cached, repeated)
    # Same numbers through other shapes (cached keys + L queries vs. one P + L pass): float32 reordering only.
    assert_fp32_close(cached, prefix_dlm_suffix, llada_reduction_length(model.config, full_embeds.shape[1]))
    assert_golden(full_pass, golden, "c_full_pass_logits")
    assert_golden(full_pass[:, prefix_length:], golden, "c_suffix_logits_full_pass")
    assert_golden(prefix_only, golden, "c_prefix_logits")
    assert cache.prefix_length == prefix_length
    for layer_index, layer in enumerate(cache.layers):
        assert_golden(layer.keys, golden, f"c_cache_layer{layer_index}_key_postrope")
        assert_golden(layer.values, golden, f"c_cache_layer{layer_index}_value")
