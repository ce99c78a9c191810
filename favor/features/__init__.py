"""Random projections and feature maps phi."""

from . import maps, projections
from .feature_map import KERNELS, FeatureMap, default_num_features
from .headwise import HeadwiseFeatureMap
from .maps import Features

__all__ = ["projections", "maps", "FeatureMap", "HeadwiseFeatureMap", "Features", "KERNELS", "default_num_features"]
