"""The shared ResNet-family backbone: registry of names, the generic body, and safe weights loading."""

from .registry import (
    BACKBONE_SPECS,
    BackboneConfig,
    BackboneSpec,
    backbone_table,
    build_backbone,
    get_spec,
    layout_hint,
    list_backbones,
    load_backbone_weights,
)
from .resnet import NORMS, ResNetBackbone
from .weights import (
    LoadReport,
    compare_state_dict,
    extract_backbone_state_dict,
    hub_checkpoint_path,
    is_torchvision_weights_name,
    label_space_of,
    load_state_dict_into,
    load_weights_spec,
    preprocessing_of,
    strip_wrapper_prefixes,
)

__all__ = [
    "BACKBONE_SPECS",
    "BackboneConfig",
    "NORMS",
    "BackboneSpec",
    "LoadReport",
    "ResNetBackbone",
    "backbone_table",
    "build_backbone",
    "compare_state_dict",
    "extract_backbone_state_dict",
    "is_torchvision_weights_name",
    "layout_hint",
    "label_space_of",
    "load_backbone_weights",
    "get_spec",
    "hub_checkpoint_path",
    "list_backbones",
    "load_state_dict_into",
    "preprocessing_of",
    "load_weights_spec",
    "strip_wrapper_prefixes",
]
