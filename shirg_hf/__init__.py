"""shirg-hf: SHIRG high-resolution token selection for LaViDa as a Hugging Face model plugin.

Importing this package registers every class with the transformers Auto classes and marks it for
remote-code export (`register_for_auto_class`), so `save_pretrained` folders load with
`trust_remote_code=True` even where this package is not installed.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .modeling.configuration_llada import LladaConfig
from .modeling.configuration_shirg_lavida import ShirgLavidaConfig
from .modeling.cache_llada import LladaPrefixCache
from .modeling.generation_diffusion import DiffusionGenerationConfig, DiffusionGenerationOutput
from .modeling.selection_shirg import SelectionOutput, ShirgSelector
from .modeling.visual_tokens import (
    Geometry,
    register_selection_method,
    register_vision_mode,
    selection_method_names,
    vision_mode_names,
)
from .modeling.modeling_llada import (
    LladaForMaskedDiffusion,
    LladaModel,
    masked_diffusion_loss,
    prefix_dlm_attention_mask,
)
from .modeling.modeling_shirg_lavida import ShirgLavidaForDiffusionLM, ShirgLavidaOutput
from .processing.image_processing_shirg import ShirgImageProcessor
from .processing.processing_shirg_lavida import LAVIDA_SYSTEM_PROMPT, ShirgLavidaProcessor, build_prompt
from .tokenization import build_tiny_tokenizer
from .evidence_demo import evidence_model_path

__version__ = "0.1.0"

AutoConfig.register(LladaConfig.model_type, LladaConfig, exist_ok=True)
AutoConfig.register(ShirgLavidaConfig.model_type, ShirgLavidaConfig, exist_ok=True)
LladaConfig.register_for_auto_class()
AutoModel.register(LladaConfig, LladaForMaskedDiffusion, exist_ok=True)
LladaForMaskedDiffusion.register_for_auto_class("AutoModel")
ShirgLavidaConfig.register_for_auto_class()
AutoModel.register(ShirgLavidaConfig, ShirgLavidaForDiffusionLM, exist_ok=True)
AutoModelForImageTextToText.register(ShirgLavidaConfig, ShirgLavidaForDiffusionLM, exist_ok=True)
ShirgLavidaForDiffusionLM.register_for_auto_class("AutoModel")
AutoImageProcessor.register(ShirgLavidaConfig, image_processor_classes={"pil": ShirgImageProcessor}, exist_ok=True)
AutoProcessor.register(ShirgLavidaConfig, ShirgLavidaProcessor, exist_ok=True)
ShirgImageProcessor.register_for_auto_class("AutoImageProcessor")
ShirgLavidaProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "LladaConfig",
    "LladaForMaskedDiffusion",
    "LladaModel",
    "LladaPrefixCache",
    "DiffusionGenerationConfig",
    "DiffusionGenerationOutput",
    "masked_diffusion_loss",
    "prefix_dlm_attention_mask",
    "ShirgLavidaConfig",
    "ShirgLavidaForDiffusionLM",
    "ShirgLavidaOutput",
    "SelectionOutput",
    "ShirgSelector",
    "Geometry",
    "register_selection_method",
    "register_vision_mode",
    "selection_method_names",
    "vision_mode_names",
    "ShirgImageProcessor",
    "ShirgLavidaProcessor",
    "LAVIDA_SYSTEM_PROMPT",
    "build_prompt",
    "build_tiny_tokenizer",
    "evidence_model_path",
]
