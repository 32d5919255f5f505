"""Processor modules, installed as `shirg_hf.processing`.

`visual_tokens.py` here is a symlink to `../modeling/visual_tokens.py`: `save_pretrained` copies a module's relative
imports from the module's own folder, so the processor's `from .visual_tokens import ...` must find the file next
to it. The alias below makes `shirg_hf.processing.visual_tokens` the very module object `shirg_hf.modeling.
visual_tokens` is, so the installed package has one registry of vision modes and selection methods. (In a saved
remote-code folder all modules are flat siblings and share one `visual_tokens` anyway.)
"""

import sys

from ..modeling import visual_tokens

sys.modules[f"{__name__}.visual_tokens"] = visual_tokens
