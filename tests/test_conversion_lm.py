"""`shirg-hf convert-lavida` on language-model-only LLaDA/LaViDa folders, and the key mapping it uses."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from shirg_hf import LladaConfig, LladaForMaskedDiffusion
from shirg_hf.cli import main as cli_main
from shirg_hf.conversion import (
    convert_lavida_checkpoint,
    rename_lavida_key,
    rename_lavida_state_dict,
)

from conftest import GOLDEN_LOGITS_TOLERANCE

# An original-format config.json (LLaDA field names), tiny sizes with grouped-query attention.
ORIGINAL_CONFIG = {
    "model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": 64, "n_heads": 4, "n_kv_heads": 2,
    "n_layers": 2, "mlp_hidden_size": 96, "vocab_size": 300, "embedding_size": 300, "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5, "max_sequence_length": 512, "mask_token_id": 299, "eos_token_id": 298,
    "pad_token_id": 298, "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True,
    "include_bias": False, "weight_tying": False,
}

# Our name -> original name, written out by hand as an independent check of the module's mapping tables.
OURS_TO_ORIGINAL_PER_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
    "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out", "post_attention_layernorm": "ff_norm",
    "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out",
}


def original_name(ours: str) -> str:
    top_level = {"model.embed_tokens.weight": "model.transformer.wte.weight", "model.norm.weight":
                 "model.transformer.ln_f.weight", "lm_head.weight": "model.transformer.ff_out.weight"}
    if ours in top_level:
        return top_level[ours]
    _, _, layer, *rest = ours.split(".")
    module = ".".join(rest[:-1])
    return f"model.transformer.blocks.{layer}.{OURS_TO_ORIGINAL_PER_LAYER[module]}.weight"


@pytest.fixture()
def source_model():
    torch.manual_seed(0)
    model = LladaForMaskedDiffusion(LladaConfig.from_lavida_config(ORIGINAL_CONFIG)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


def write_original_folder(folder, model, shards=1, dtype=torch.float32, extra_tensors=None):
    """Save `model` as an original LLaDA folder: config.json + model.transformer.* safetensors (maybe sharded)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(ORIGINAL_CONFIG))
    state = {original_name(name): tensor.to(dtype).contiguous() for name, tensor in model.state_dict().items()}
    state.update(extra_tensors or {})
    names = sorted(state)
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for shard in range(shards):
        shard_name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        chunk = names[shard::shards]
        save_file({name: state[name] for name in chunk}, str(folder / shard_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, shard_name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def leftovers(parent):
    return sorted(path.name for path in parent.iterdir() if path.name.startswith("."))


def test_mapping_renames_every_original_key_including_the_ff_out_collision(source_model):
    for ours in source_model.state_dict():
        assert rename_lavida_key(original_name(ours)) == ours
    assert rename_lavida_key("model.transformer.ff_out.weight") == "lm_head.weight"
    assert rename_lavida_key("model.transformer.blocks.11.ff_out.weight") == "model.layers.11.mlp.down_proj.weight"
    assert rename_lavida_key("model.transformer.blocks.0.ff_out.bias") is None


def test_rename_state_dict_reports_unmapped_missing_and_misshapen_keys(source_model):
    config = source_model.config
    original = {original_name(name): tensor for name, tensor in source_model.state_dict().items()}
    renamed = rename_lavida_state_dict(original, config)
    assert set(renamed) == set(source_model.state_dict())
    with pytest.raises(ValueError, match="model.transformer.extra.weight"):
        rename_lavida_state_dict({**original, "model.transformer.extra.weight": torch.zeros(1)}, config)
    incomplete = dict(original)
    del incomplete["model.transformer.blocks.1.up_proj.weight"]
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        rename_lavida_state_dict(incomplete, config)
    misshapen = {**original, "model.transformer.ln_f.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match="ln_f"):
        rename_lavida_state_dict(misshapen, config)


@pytest.mark.parametrize("shards", [1, 3])
def test_convert_then_auto_model_reproduces_the_source(tmp_path, source_model, shards):
    write_original_folder(tmp_path / "src", source_model, shards=shards)
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    (tmp_path / "src" / "modeling_llada.py").write_text("raise RuntimeError('original remote code')\n")
    dst = convert_lavida_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert (dst / "tokenizer_config.json").is_file()
    assert "original remote code" not in (dst / "modeling_llada.py").read_text()
    assert ((dst / "model.safetensors.index.json").is_file()) == (shards > 1)
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "shirg_llada" and config["architectures"] == ["LladaForMaskedDiffusion"]
    loaded, info = AutoModel.from_pretrained(dst, output_loading_info=True)
    assert type(loaded) is LladaForMaskedDiffusion
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    input_ids = torch.randint(0, ORIGINAL_CONFIG["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, source_model(input_ids=input_ids).logits)
    assert leftovers(tmp_path) == []


def test_bf16_checkpoint_stays_bf16(tmp_path, source_model):
    write_original_folder(tmp_path / "src", source_model, dtype=torch.bfloat16)
    dst = convert_lavida_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(tensor.dtype == torch.bfloat16 for tensor in load_file(dst / "model.safetensors").values())
    assert AutoModel.from_pretrained(dst).dtype == torch.bfloat16


def test_existing_destination_needs_overwrite(tmp_path, source_model):
    write_original_folder(tmp_path / "src", source_model)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_lavida_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst" / "stale.txt").is_file()
    convert_lavida_checkpoint(tmp_path / "src", tmp_path / "dst", overwrite=True)
    assert not (tmp_path / "dst" / "stale.txt").exists() and (tmp_path / "dst" / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_incomplete_multimodal_checkpoint_reports_missing_keys(tmp_path, source_model):
    vision = {"model.vision_tower.vision_tower.vision_model.post_layernorm.weight": torch.ones(4),
              "model.mm_projector.0.weight": torch.ones(64, 4), "model.image_newline": torch.ones(64)}
    write_original_folder(tmp_path / "src", source_model, extra_tensors=vision)
    with pytest.raises((ValueError, KeyError)) as error:
        convert_lavida_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert "patch_embedding" in str(error.value)
    assert not (tmp_path / "dst").exists() and leftovers(tmp_path) == []


def test_bad_sources_are_refused(tmp_path, source_model):
    with pytest.raises(FileNotFoundError):
        convert_lavida_checkpoint(tmp_path / "missing", tmp_path / "dst")
    write_original_folder(tmp_path / "src", source_model)
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        convert_lavida_checkpoint(tmp_path / "src", tmp_path / "dst")
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    os.remove(tmp_path / "src" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        convert_lavida_checkpoint(tmp_path / "src", tmp_path / "dst")


def test_cli_convert_lavida(tmp_path, source_model, capsys):
    write_original_folder(tmp_path / "src", source_model)
    assert cli_main(["convert-lavida", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    assert cli_main(["convert-lavida", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["convert-lavida", str(tmp_path / "src"), str(tmp_path / "dst"), "--overwrite"]) == 0


def test_converted_folder_loads_as_remote_code_without_the_package(tmp_path, source_model):
    write_original_folder(tmp_path / "src", source_model)
    dst = convert_lavida_checkpoint(tmp_path / "src", tmp_path / "dst")
    input_ids = torch.randint(0, ORIGINAL_CONFIG["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = source_model(input_ids=input_ids).logits
    torch.save({"input_ids": input_ids, "expected": expected}, tmp_path / "probe.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModel\n"
        f"model = AutoModel.from_pretrained({str(dst)!r}, trust_remote_code=True)\n"
        "assert 'shirg_hf' not in sys.modules, 'the remote-code path must not import the package'\n"
        f"probe = torch.load({str(tmp_path / 'probe.pt')!r})\n"
        "with torch.no_grad():\n"
        "    logits = model(input_ids=probe['input_ids']).logits\n"
        "assert torch.equal(logits, probe['expected']), (logits - probe['expected']).abs().max()\n"
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_golden_folder_converts_and_reproduces_case_a(tmp_path, golden_dir):
    """The golden weights through the converter: HF-format config.json of the original + its safetensors."""
    hf_config = json.loads((golden_dir / "lm_tiny_config.json").read_text())["hf_config"]
    source = tmp_path / "golden_src"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(hf_config))
    (source / "model.safetensors").symlink_to(golden_dir / "lm_tiny.safetensors")
    model = AutoModel.from_pretrained(convert_lavida_checkpoint(source, tmp_path / "dst"), dtype=torch.float32)
    cases = load_file(golden_dir / "lm_cases.safetensors")
    with torch.no_grad():
        logits = model(input_ids=cases["a_input_ids"]).logits
    torch.testing.assert_close(logits, cases["a_logits"], **GOLDEN_LOGITS_TOLERANCE)
