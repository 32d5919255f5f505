"""Configuration of the LLaDA masked-diffusion language model (the LM inside LaViDa).

`model_type` is `"shirg_llada"`: it deliberately differs from the original remote code's `"llada"` so
that both can be registered side by side. `LladaConfig.from_lavida_config` reads the original
LLaDA / LaViDa `config.json` field names (`d_model`, `n_heads`, ...).
"""

from transformers import PreTrainedConfig


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"Invalid config field `{field}`: {message}")


def drop_legacy_fields(kwargs: dict, legacy: dict) -> None:
    """Remove fields earlier versions saved but that never changed the model; refuse a value they did not allow
    (`legacy`: field -> its only allowed value, or None when any value was a no-op)."""
    for field, only_value in legacy.items():
        value = kwargs.pop(field, only_value)
        if only_value is not None and value != only_value:
            raise ValueError(f"Invalid config field `{field}`: this model has no such setting (it always behaves as "
                             f"{field}={only_value!r}); remove it from config.json")


# Fields of earlier versions that changed nothing: the MLP is always SwiGLU; `generate` always caches the prefix.
LEGACY_FIELDS = {"hidden_act": "silu", "use_cache": None}

# Original LLaDA / LaViDa config.json name -> LladaConfig field.
LAVIDA_TEXT_FIELD_NAMES = {
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "mlp_hidden_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "max_sequence_length": "max_position_embeddings",
    "mask_token_id": "mask_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}


class LladaConfig(PreTrainedConfig):
    r"""
    Sizes and special ids of a bidirectional LLaDA backbone (pre-norm RMSNorm blocks, RoPE, SwiGLU MLP, no
    biases, untied LM head).

    Defaults are LLaDA-8B-Instruct as used by LaViDa (`LladaConfig.llada_8b()` returns the same);
    `LladaConfig.tiny()` is a few-kilobyte model for tests and demos.
    """

    model_type = "shirg_llada"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 126464
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    mask_token_id: int = 126336
    eos_token_id: int | None = 126081
    pad_token_id: int | None = 126081
    bos_token_id: int | None = 126080
    eot_token_id: int | None = 126348
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        drop_legacy_fields(kwargs, LEGACY_FIELDS)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the offending field when sizes or ids are inconsistent."""
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, field)
            _require(isinstance(value, int) and value >= 1, field, f"must be an integer >= 1, got {value!r}")
        _require(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
                 f"must divide hidden_size={self.hidden_size}, got {self.num_attention_heads}")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                 f"must divide num_attention_heads={self.num_attention_heads}, got {self.num_key_value_heads}")
        _require(self.head_dim * self.num_attention_heads == self.hidden_size, "head_dim",
                 f"must equal hidden_size / num_attention_heads = {self.hidden_size // self.num_attention_heads}, "
                 f"got {self.head_dim}")
        _require(self.head_dim % 2 == 0, "head_dim", f"must be even for the rotary embedding, got {self.head_dim}")
        _require(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        _require(0 < self.rms_norm_eps < 1, "rms_norm_eps", f"must be in (0, 1), got {self.rms_norm_eps}")
        _require(0 <= self.attention_dropout < 1, "attention_dropout",
                 f"must be in [0, 1), got {self.attention_dropout}")
        _require(not self.tie_word_embeddings, "tie_word_embeddings",
                 "LLaDA's LM head is untied (weight_tying=false): must be False")
        for field in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "eot_token_id"):
            value = getattr(self, field)
            if field == "mask_token_id" or value is not None:
                _require(isinstance(value, int) and 0 <= value < self.vocab_size, field,
                         f"must be a token id in [0, {self.vocab_size - 1}] (vocab_size={self.vocab_size}), got {value!r}")

    @classmethod
    def llada_8b(cls, **overrides) -> "LladaConfig":
        """LLaDA-8B-Instruct, the language model of the released LaViDa checkpoints."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "LladaConfig":
        """A tiny LLaDA (hidden 64, 2 layers, grouped-query attention) for tests and demos."""
        sizes = dict(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            mask_token_id=511, eos_token_id=510, pad_token_id=510, bos_token_id=500, eot_token_id=503,
        )
        sizes.update(overrides)
        return cls(**sizes)

    @classmethod
    def from_lavida_config(cls, lavida_config: dict, **overrides) -> "LladaConfig":
        """Build from an original LLaDA / LaViDa `config.json` dict (`d_model`, `n_heads`, ... field names).

        Refuses configs whose architecture flags differ from what this port implements (biases, ALiBi,
        QK-norm, weight tying, non-llama blocks) instead of silently loading a different model.
        """
        unsupported = {
            "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True,
            "alibi": False, "attention_layer_norm": False, "include_bias": False, "include_qkv_bias": False,
            "weight_tying": False, "input_emb_norm": False, "scale_logits": False, "block_group_size": 1,
        }
        for field, expected in unsupported.items():
            if field in lavida_config and lavida_config[field] != expected:
                raise ValueError(
                    f"Unsupported LLaDA config: `{field}` = {lavida_config[field]!r}; this port implements "
                    f"only `{field}` = {expected!r} (the LLaDA-8B / LaViDa architecture)."
                )
        missing = [name for name in ("d_model", "n_layers", "n_heads", "vocab_size") if name not in lavida_config]
        if missing:
            raise ValueError(
                f"Not an original LLaDA/LaViDa config.json: missing fields {missing}. Expected `d_model`, "
                "`n_layers`, `n_heads`, `vocab_size`, ... as written by LLaDA's configuration_llada.py."
            )
        kwargs = {ours: lavida_config[theirs] for theirs, ours in LAVIDA_TEXT_FIELD_NAMES.items()
                  if lavida_config.get(theirs) is not None}
        embedding_size = lavida_config.get("embedding_size")
        if embedding_size:
            kwargs["vocab_size"] = embedding_size
        if "intermediate_size" not in kwargs and lavida_config.get("mlp_ratio"):
            kwargs["intermediate_size"] = lavida_config["mlp_ratio"] * kwargs["hidden_size"]
        # Original configs carry no BOS / end-of-turn ids (they live in the tokenizer): keep LLaDA-8B's only where
        # they fit the vocabulary (a tiny test vocabulary gets None).
        for field in ("bos_token_id", "eot_token_id"):
            default = getattr(cls, field)
            if default is not None and default >= kwargs["vocab_size"]:
                kwargs[field] = None
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        kwargs.update(overrides)
        return cls(**kwargs)


__all__ = ["LladaConfig"]
