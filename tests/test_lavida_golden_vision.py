"""Golden parity of the vision side with the ORIGINAL LaViDa code (cases v1 and v2 of ../shared/golden).

Every size, id and setting is read from the golden JSON files; the weights are loaded through the converter's
key mapping (`shirg_hf.conversion`), exactly as a real LaViDa checkpoint would be.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from shirg_hf import ShirgLavidaForDiffusionLM
from shirg_hf.conversion import lavida_multimodal_config, rename_lavida_state_dict

from conftest import GOLDEN_VISION_ATOL

IMAGE_TOKEN_INDEX = -200  # LaViDa's in-ids image marker


@pytest.fixture(scope="module")
def golden_model(golden_dir):
    """The golden LaViDa weights converted exactly as `shirg-hf convert-lavida` converts a checkpoint."""
    tiny = json.loads((golden_dir / "lm_tiny_config.json").read_text())
    state = {**load_file(golden_dir / "lm_tiny.safetensors"), **load_file(golden_dir / "vision_tiny.safetensors")}
    text = tiny["llada_model_config"]
    special = {text["mask_token_id"], text["eos_token_id"], text["pad_token_id"]}
    free_id = max(set(range(text["vocab_size"])) - special)
    heads = tiny["tiny_vision_tower_config"]["equivalent_transformers_SiglipVisionConfig"]["num_attention_heads"]
    config = lavida_multimodal_config(tiny["hf_config"], {k: tuple(v.shape) for k, v in state.items()},
                                      num_attention_heads=heads, image_token_id=free_id)
    assert config.vision_mode == "lavida-hd"
    model = ShirgLavidaForDiffusionLM(config).eval()
    model.load_state_dict(rename_lavida_state_dict(state, config), strict=True)
    return model


@pytest.fixture(scope="module")
def vision_cases(golden_dir):
    return load_file(golden_dir / "vision_cases.safetensors"), json.loads((golden_dir / "vision_cases.json").read_text())


def test_v1_tower_projector_pooling(golden_model, vision_cases):
    tensors, _ = vision_cases
    with torch.no_grad():
        features = golden_model.vision_features(tensors["v1_pixel_values"])
        projected = golden_model.multi_modal_projector(features)
        pooled = golden_model.pool_views(projected)
    torch.testing.assert_close(features, tensors["v1_tower_features"], atol=GOLDEN_VISION_ATOL, rtol=0)
    torch.testing.assert_close(projected, tensors["v1_projected"], atol=GOLDEN_VISION_ATOL, rtol=0)
    torch.testing.assert_close(pooled, tensors["v1_pooled_bilinear"], atol=GOLDEN_VISION_ATOL, rtol=0)


def v2_inputs(golden_model, tensors, meta):
    """The golden prompt with LaViDa's single -200 marker expanded into one image token per visual token."""
    ids = tensors["v2_input_ids"][0].tolist()
    n_image = meta["v2"]["n_image_tokens"]
    marker = ids.index(meta["v2"]["image_token_index"])
    expanded = ids[:marker] + [golden_model.config.image_token_id] * n_image + ids[marker + 1:]
    return torch.tensor([expanded]), [tensors["v2_pixel_values_crops"]], torch.tensor(meta["v2"]["image_sizes"])


def test_v2_anyres_assembly_and_embeddings(golden_model, vision_cases):
    tensors, meta = vision_cases
    input_ids, pixel_values, image_sizes = v2_inputs(golden_model, tensors, meta)
    with torch.no_grad():
        image_tokens = golden_model.get_image_features(pixel_values, image_sizes=image_sizes)[0][0]
        inputs_embeds, _ = golden_model.embed_multimodal(input_ids, pixel_values, image_sizes)
    assert image_tokens.shape == tensors["v2_image_tokens"].shape
    torch.testing.assert_close(image_tokens, tensors["v2_image_tokens"], atol=GOLDEN_VISION_ATOL, rtol=0)
    torch.testing.assert_close(inputs_embeds, tensors["v2_inputs_embeds"], atol=GOLDEN_VISION_ATOL, rtol=0)


def test_v2_generate_token_exact(golden_model, vision_cases):
    tensors, meta = vision_cases
    input_ids, pixel_values, image_sizes = v2_inputs(golden_model, tensors, meta)
    kwargs = {k: v for k, v in meta["v2"]["generate_kwargs"].items() if k in (
        "max_new_tokens", "block_length", "step_ratio", "schedule", "temperature")}
    output = golden_model.generate(
        input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes, attention_mask=torch.ones_like(input_ids),
        return_dict_in_generate=True, **kwargs,
    )
    assert output.sequences.tolist() == meta["v2"]["generated_ids"]
    assert torch.equal(output.history, tensors["v2_history"])
