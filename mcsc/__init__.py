"""mcsc: Multi-Scale Cross Supervised Contrastive learning for semi-supervised segmentation.

The core is a fused C++/CUDA operator for the pixel supervised contrastive loss with
class-prevalence weights: ``from mcsc import supcon_loss``.
"""

from mcsc.ops import backend, supcon_loss

__version__ = "0.1.0"
__all__ = ["supcon_loss", "backend", "__version__"]
