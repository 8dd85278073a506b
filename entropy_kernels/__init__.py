"""Fused differentiable spatial entropy loss for low-light image enhancement.

Public API: :func:`spatial_entropy_loss`, :class:`SpatialEntropyLoss`, the counting
entropies :func:`entropy` and :func:`spatial_entropy`, and :func:`available_backends` (a
:class:`BackendStatus` per device type and backend).
"""
from .backends import BackendStatus, available_backends
from .counting import entropy, spatial_entropy
from .loss import SpatialEntropyLoss, spatial_entropy_loss
from .options import ClampWarning

__all__ = [
    "spatial_entropy_loss", "SpatialEntropyLoss", "entropy", "spatial_entropy", "available_backends", "BackendStatus",
    "ClampWarning",
]
__version__ = "0.2.0"
