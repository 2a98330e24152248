"""Model registry: ``build_model(name, **kwargs)``; ``list_models()`` names what is registered."""

from harmonia.models import backbones as _backbones  # noqa: F401  (registers torchvision names, timm/<name>)
from harmonia.models import cnn as _cnn  # noqa: F401  (registers lipschitz_cnn and cnn)
from harmonia.models.backbones import Backbone, load_weights, read_state_dict
from harmonia.models.checkpointing import checkpoint_segments, find_blocks
from harmonia.models.cnn import ConvNet, conv_net
from harmonia.models.layers import GroupSort2, L2NormPool2d
from harmonia.models.lipschitz import LayerBound, NetworkBound, conv_norm_bound, export, lipschitz_bound, operator_norm
from harmonia.models.orthogonal import BjorckConv2d, BjorckLinear, cached_weights
from harmonia.models.registry import build_model, list_models, register_family, register_model

__all__ = [
    "Backbone",
    "BjorckConv2d",
    "BjorckLinear",
    "ConvNet",
    "GroupSort2",
    "L2NormPool2d",
    "LayerBound",
    "NetworkBound",
    "build_model",
    "cached_weights",
    "checkpoint_segments",
    "find_blocks",
    "conv_net",
    "conv_norm_bound",
    "export",
    "lipschitz_bound",
    "list_models",
    "load_weights",
    "operator_norm",
    "read_state_dict",
    "register_family",
    "register_model",
]
