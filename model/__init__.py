"""IR-SDE with a Conditional NAFNet noise network (the diffusion model trained by `train`)."""
from .nafnet import PRESETS, ConditionalNAFNet, build_network, build_noise_network
from .sde import IRSDE, cosine_theta_schedule
from .tiling import TiledNetwork

__all__ = ["ConditionalNAFNet", "build_network", "build_noise_network", "PRESETS", "IRSDE", "cosine_theta_schedule", "TiledNetwork"]
