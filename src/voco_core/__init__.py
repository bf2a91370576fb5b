"""voco_core: VoCo volume-contrastive pretraining for 3D medical images.

Headless library: no Qt and no napari imports anywhere in this package, so it
runs on servers and under ``torchrun``. Importing the top-level package is cheap
(torch is imported by the submodules that need it).
"""

__version__ = "0.1.0"

from voco_core.errors import VoCoConfigError, VoCoDataError, VoCoError

__all__ = ["VoCoConfigError", "VoCoDataError", "VoCoError", "__version__"]
