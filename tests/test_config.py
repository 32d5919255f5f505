"""ShirgLavidaConfig / LladaConfig: lossless JSON round trips and ValueErrors that name the offending field."""

import json
import re

import pytest
from transformers import SiglipVisionConfig

from shirg_hf import LladaConfig, ShirgLavidaConfig

PRESETS = [
    pytest.param(ShirgLavidaConfig.tiny, id="shirg_lavida-tiny"),
    pytest.param(ShirgLavidaConfig.lavida_llada_8b, id="shirg_lavida-lavida_llada_8b"),
    pytest.param(LladaConfig.tiny, id="llada-tiny"),
    pytest.param(LladaConfig.llada_8b, id="llada-llada_8b"),
]


def _without_auto_map(config_dict: dict) -> dict:
    return {key: value for key, value in config_dict.items() if key != "auto_map"}


@pytest.mark.parametrize("make_config", PRESETS)
def test_to_dict_from_dict_is_lossless(make_config):
    config = make_config()
    restored = type(config).from_dict(config.to_dict())
    assert restored.to_dict() == config.to_dict()
    # the dict must also survive JSON (no tuples, tensors or other non-JSON values hiding in it)
    assert type(config).from_dict(json.loads(config.to_json_string())).to_dict() == config.to_dict()


@pytest.mark.parametrize("make_config", PRESETS)
def test_save_pretrained_from_pretrained_is_lossless(make_config, tmp_path):
    config = make_config()
    expected = config.to_dict()
    config.save_pretrained(tmp_path)
    restored = type(config).from_pretrained(tmp_path)
    assert _without_auto_map(restored.to_dict()) == _without_auto_map(expected)
    # register_for_auto_class: the saved folder names its own code for trust_remote_code loading
    saved = json.loads((tmp_path / "config.json").read_text())
    module = "configuration_shirg_lavida" if isinstance(config, ShirgLavidaConfig) else "configuration_llada"
    assert saved["auto_map"]["AutoConfig"] == f"{module}.{type(config).__name__}"
    assert (tmp_path / f"{module}.py").is_file()


def test_round_trip_keeps_sub_config_types_and_derived_sizes(tmp_path):
    config = ShirgLavidaConfig.lavida_llada_8b()
    config.save_pretrained(tmp_path)
    restored = ShirgLavidaConfig.from_pretrained(tmp_path)
    assert isinstance(restored.vision_config, SiglipVisionConfig)
    assert isinstance(restored.text_config, LladaConfig)
    assert restored.vision_config.num_hidden_layers == 26
    assert restored.num_highres_patches == config.num_highres_patches == 48 * 48
    assert restored.num_image_tokens() == config.num_image_tokens() == 768 + 1
    assert restored.geometry == config.geometry and restored.geometry.pooled_side == 14


def _raises_naming(field: str):
    return pytest.raises(ValueError, match=re.escape(f"`{field}`"))


@pytest.mark.parametrize(
    "build, field",
    [
        pytest.param(lambda: ShirgLavidaConfig.tiny(selection={"budget": 15}), "selection.budget",
                     id="budget-below-coverage-cells"),
        pytest.param(lambda: ShirgLavidaConfig.tiny(selection={"budget": 145}), "selection.budget",
                     id="budget-above-token-count"),
        pytest.param(lambda: ShirgLavidaConfig.tiny(selection={"weights": [0.6, 0.3, 0.15]}), "selection.weights",
                     id="weights-not-summing-to-one"),
        pytest.param(lambda: ShirgLavidaConfig.tiny(vision_mode="hd"), "vision_mode", id="unknown-vision-mode"),
        pytest.param(lambda: ShirgLavidaConfig.tiny(selection={"method": "topk"}), "selection.method",
                     id="unknown-selection-method"),
        pytest.param(lambda: LladaConfig.tiny(num_attention_heads=5), "num_attention_heads",
                     id="llada-heads-not-dividing-hidden"),
        pytest.param(lambda: ShirgLavidaConfig.tiny(text_config=LladaConfig.tiny().to_dict() | {
            "num_attention_heads": 6, "num_key_value_heads": 6, "head_dim": None}), "num_attention_heads",
            id="text-config-heads-not-dividing-hidden"),
        pytest.param(lambda: ShirgLavidaConfig.tiny(vision_config=ShirgLavidaConfig.tiny().vision_config.to_dict() | {
            "num_attention_heads": 3}), "vision_config.num_attention_heads", id="vision-heads-not-dividing-hidden"),
        pytest.param(lambda: LladaConfig.tiny(num_key_value_heads=3), "num_key_value_heads",
                     id="kv-heads-not-dividing-heads"),
        pytest.param(lambda: LladaConfig.tiny(mask_token_id=512), "mask_token_id", id="mask-id-outside-vocab"),
        pytest.param(lambda: LladaConfig.tiny(eos_token_id=600), "eos_token_id", id="eos-id-outside-vocab"),
        pytest.param(lambda: LladaConfig.tiny(pad_token_id=-1), "pad_token_id", id="pad-id-negative"),
        pytest.param(lambda: LladaConfig.tiny(bos_token_id=512), "bos_token_id", id="bos-id-outside-vocab"),
        pytest.param(lambda: LladaConfig.tiny(eot_token_id=1000), "eot_token_id", id="eot-id-outside-vocab"),
        pytest.param(lambda: ShirgLavidaConfig.tiny(image_token_id=512), "image_token_id",
                     id="image-token-id-outside-vocab"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(build, field):
    with _raises_naming(field):
        build()


def test_budget_bounds_are_inclusive():
    # 4x4 coverage cells <= K <= 12x12 patches: both ends are valid
    assert ShirgLavidaConfig.tiny(selection={"budget": 16}).num_image_tokens() == 17
    assert ShirgLavidaConfig.tiny(selection={"budget": 144}).num_image_tokens() == 144


def test_configs_saved_with_the_removed_no_op_fields_still_load(tmp_path):
    ShirgLavidaConfig.tiny().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "projector_hidden_act" not in saved and not {"hidden_act", "use_cache"} & set(saved["text_config"])
    saved["projector_hidden_act"] = "gelu"
    saved["text_config"].update(hidden_act="silu", use_cache=False)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    restored = ShirgLavidaConfig.from_pretrained(tmp_path)
    assert not hasattr(restored, "projector_hidden_act") and not hasattr(restored.text_config, "use_cache")
    saved["text_config"]["hidden_act"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with _raises_naming("hidden_act"):
        ShirgLavidaConfig.from_pretrained(tmp_path)
