"""voco_core: VoCo volume-contrastive pretraining for 3D medical images.

Headless library: no Qt and no napari imports anywhere in this package, so it
runs on servers and under ``torchrun``. Importing the top-level package is cheap
(torch is imported by the submodules that need it).
"""

import os

__version__ = "0.1.0"

# Transparent huge pages for torch's CPU allocator: on CPU training the large
# activations otherwise page-fault so much that system time exceeds user time
# (docs/benchmarks.md). Read when torch allocates, so it is set before torch is
# imported; a user's own setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from voco_core.errors import VoCoConfigError, VoCoDataError, VoCoError

__all__ = ["VoCoConfigError", "VoCoDataError", "VoCoError", "__version__"]
