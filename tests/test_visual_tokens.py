"""The visual-token contract: one registry of vision modes and selection methods, one count rule, one source.

A method and a vision mode registered from outside the package work through config, processor, selector, model,
`generate`, the collator and the command line with no other edit; no module keeps a second copy of the names or
of LaViDa's geometry numbers.
"""

import ast
import importlib
import pkgutil
from pathlib import Path

import PIL.Image
import pytest
import torch

import shirg_hf
from shirg_hf import (
    ShirgLavidaConfig,
    ShirgLavidaForDiffusionLM,
    ShirgLavidaProcessor,
    build_prompt,
    build_tiny_tokenizer,
    register_selection_method,
    register_vision_mode,
)
from shirg_hf.cli import build_parser
from shirg_hf.modeling import visual_tokens
from shirg_hf.training import ShirgDiffusionCollator, synthetic_shapes_dataset

GENERATE = dict(max_new_tokens=4, block_length=4, step_ratio=0.5)
PACKAGE_ROOTS = [Path(shirg_hf.__file__).parent, Path(visual_tokens.__file__).parent,
                 Path(shirg_hf.processing.__file__).parent]


@pytest.fixture()
def edges_method():
    """A throw-away selection method, registered from outside the package: ONE decorated function."""

    @register_selection_method("edges_only", uses_coverage=False, adds_summary=False)
    def edges_only(features, grid_size, settings, **inputs):
        rows, cols = grid_size
        grid = features.float().view(rows, cols, -1)
        change = torch.zeros(rows, cols)
        change[:, 1:] += (grid[:, 1:] - grid[:, :-1]).norm(dim=-1)
        return change.flatten()

    yield "edges_only"
    visual_tokens.SELECTION_METHODS.pop("edges_only")


@pytest.fixture()
def corner_mode():
    """A throw-away vision mode, registered from outside the package: ONE call with both halves."""

    @register_vision_mode("corner", view_side="native", count=lambda geometry, image_size: 4)
    def corner(model, pixel_values, **unused):
        features = model.vision_features(pixel_values)[:, :4]  # the first 4 native patches
        return list(model.multi_modal_projector(features).unbind(0)), None

    yield "corner"
    visual_tokens.VISION_MODES.pop("corner")


def images(count=2):
    return [PIL.Image.new("RGB", (60 + 10 * i, 40), (40 * i, 90, 200)) for i in range(count)]


def test_a_method_registered_outside_the_package_works_everywhere(edges_method):
    config = ShirgLavidaConfig.tiny(selection={"method": edges_method, "budget": 10})  # config validation
    torch.manual_seed(0)
    model = ShirgLavidaForDiffusionLM(config).eval()
    processor = ShirgLavidaProcessor.from_model_config(config, build_tiny_tokenizer())
    inputs = processor(images=images(), text=[build_prompt("What?"), build_prompt("Which?")], return_tensors="pt")
    assert inputs["selection_method"] == edges_method and inputs["shirg_budget"] == 10
    assert int((inputs["input_ids"][0] == config.image_token_id).sum()) == 10  # adds_summary=False: K tokens
    selection = model.selector(torch.randn(2, 144, 32), grid_size=(12, 12))  # selection
    assert selection.kept_indices.shape == (2, 10) and not selection.has_summary
    assert model(**inputs).kept_indices.shape == (2, 10)  # model forward
    assert model.generate(**inputs, **GENERATE).shape == (2, 4)  # generate
    # per call, on a model configured for another method; coverage-free: K may go below the 16 cells
    shirg_model = ShirgLavidaForDiffusionLM(ShirgLavidaConfig.tiny()).eval()
    shirg_processor = ShirgLavidaProcessor.from_model_config(shirg_model.config, build_tiny_tokenizer())
    per_call = shirg_processor(images=images(1), text=[build_prompt("Q")], selection_method=edges_method,
                               shirg_budget=5)
    assert shirg_model(**per_call).kept_indices.shape == (1, 5)
    batch = ShirgDiffusionCollator(processor, 511, budgets=(10, 20))(list(synthetic_shapes_dataset(2)))  # collator
    assert torch.isfinite(model(**batch).loss)
    select = next(action for action in build_parser()._subparsers._group_actions[0].choices["select"]._actions
                  if action.dest == "method")
    assert edges_method in select.choices  # command line


def test_a_vision_mode_registered_outside_the_package_works_everywhere(corner_mode):
    config = ShirgLavidaConfig.tiny(vision_mode=corner_mode)
    model = ShirgLavidaForDiffusionLM(config).eval()
    processor = ShirgLavidaProcessor.from_model_config(config, build_tiny_tokenizer())
    inputs = processor(images=images(), text=[build_prompt("What?"), build_prompt("Which?")], return_tensors="pt")
    assert inputs["pixel_values"].shape[-1] == config.vision_config.image_size  # view_side="native"
    assert int((inputs["input_ids"][0] == config.image_token_id).sum()) == 4
    assert model.generate(**inputs, **GENERATE).shape == (2, 4)
    shirg_processor = ShirgLavidaProcessor.from_model_config(ShirgLavidaConfig.tiny(), build_tiny_tokenizer())
    collator = ShirgDiffusionCollator(shirg_processor, 511, budgets=(corner_mode, 20), seed=1)
    drawn = {collator(list(synthetic_shapes_dataset(2)))["vision_mode"] for _ in range(6)}
    assert drawn == {corner_mode, "shirg"}  # mixed into SHIRG training batches
    convert = next(action for action in build_parser()._subparsers._group_actions[0].choices["convert-lavida"]
                   ._actions if action.dest == "vision_mode")
    assert corner_mode in convert.choices


def test_one_module_object_holds_the_registries():
    assert shirg_hf.processing.visual_tokens is visual_tokens
    from shirg_hf.processing import processing_shirg_lavida

    assert processing_shirg_lavida.get_vision_mode is visual_tokens.get_vision_mode


def _package_modules() -> list[str]:
    """Every module of the installed package (`modeling/` and `processing/` are mapped into it)."""
    packages = zip(PACKAGE_ROOTS, ("shirg_hf", "shirg_hf.modeling", "shirg_hf.processing"))
    return sorted({info.name for root, package in packages
                   for info in pkgutil.walk_packages([str(root)], prefix=f"{package}.")})


def test_no_module_keeps_a_second_copy_of_the_names_or_the_geometry():
    names = set(visual_tokens.vision_mode_names()) | set(visual_tokens.selection_method_names())
    geometry = visual_tokens.LAVIDA_GEOMETRY
    numbers = {geometry.highres_side, geometry.native_side, geometry.num_highres_patches,
               (geometry.native_side // geometry.patch_size) ** 2}
    pinpoints = {tuple(p) for p in geometry.pinpoints}
    offenders, modules = [], _package_modules()
    assert {"shirg_hf.train", "shirg_hf.modeling.modeling_shirg_lavida", "shirg_hf.processing.processing_shirg_lavida",
            "shirg_hf.metrics.anls"} <= set(modules)
    for module_name in modules:
        module = importlib.import_module(module_name)  # every module imports
        if module.__name__.endswith(".visual_tokens"):
            continue
        for attribute, value in vars(module).items():  # no module-level list of the names
            if value is visual_tokens.SCORE_TERMS:  # the contract's own constant, imported
                continue
            if isinstance(value, (tuple, list, set, frozenset)) and len(names & {v for v in value
                                                                                  if isinstance(v, str)}) >= 2:
                offenders.append(f"{module_name}.{attribute}")
        tree = ast.parse(Path(module.__file__).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):  # a literal list of names, or of canvases
                strings = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                if len(strings & names) >= 2:
                    offenders.append(f"{module_name}:{node.lineno} names {sorted(strings & names)}")
                pairs = {tuple(c.value for c in e.elts) for e in node.elts if isinstance(e, (ast.List, ast.Tuple))
                         and all(isinstance(c, ast.Constant) for c in e.elts)}
                if len(pairs & pinpoints) >= 2:
                    offenders.append(f"{module_name}:{node.lineno} anyres pinpoints")
            if isinstance(node, ast.Compare) and any(word in ast.unparse(node) for word in ("mode", "method")):
                constants = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(isinstance(c.value, str) and c.value in names for c in constants):  # a string switch
                    offenders.append(f"{module_name}:{node.lineno} compares with {ast.unparse(node)}")
            if isinstance(node, ast.Constant) and type(node.value) is int and node.value in numbers:
                offenders.append(f"{module_name}:{node.lineno} geometry number {node.value}")
    assert offenders == [], "\n".join(offenders)


def test_budget_rule_has_one_error_text():
    selection = visual_tokens.check_selection({"budget": 32, "coverage_cells": [4, 4]}, (12, 12))
    messages = set()
    for check in (lambda: visual_tokens.check_budget(8, selection, 144),
                  lambda: ShirgLavidaConfig.tiny(selection={"budget": 8}),
                  lambda: ShirgLavidaProcessor.from_model_config(ShirgLavidaConfig.tiny(), build_tiny_tokenizer())
                  .check_budget(8),
                  lambda: shirg_hf.ShirgSelector(budget=32, coverage_cells=(4, 4))(torch.randn(1, 144, 8), budget=8)):
        with pytest.raises(ValueError) as error:
            check()
        messages.add(str(error.value).split("Invalid ")[-1])
    assert len(messages) == 1, messages
