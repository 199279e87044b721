"""The shared ResNet-family backbone: registry of names, the generic body, and safe weights loading."""

from .registry import BACKBONE_SPECS, BackboneSpec, backbone_table, build_backbone, get_spec, list_backbones
from .resnet import NORMS, ResNetBackbone
from .weights import (
    LoadReport,
    extract_backbone_state_dict,
    hub_checkpoint_path,
    load_state_dict_into,
    load_weights_spec,
    strip_wrapper_prefixes,
)

__all__ = [
    "BACKBONE_SPECS",
    "NORMS",
    "BackboneSpec",
    "LoadReport",
    "ResNetBackbone",
    "backbone_table",
    "build_backbone",
    "extract_backbone_state_dict",
    "get_spec",
    "hub_checkpoint_path",
    "list_backbones",
    "load_state_dict_into",
    "load_weights_spec",
    "strip_wrapper_prefixes",
]
