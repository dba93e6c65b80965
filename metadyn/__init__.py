"""metadyn: dynamic inference (early exits, layer skipping) for PyTorch, with a data-efficiency plugin.

``import metadyn`` imports torch and nothing optional (no torchvision, matplotlib, learn2learn, higher).
"""

__version__ = "0.1.0"

from metadyn.core.backbones.base import MultiExitNet  # noqa: E402
from metadyn.core.outputs import ExitOutput  # noqa: E402
from metadyn.errors import InputError  # noqa: E402

__all__ = ["ExitOutput", "InputError", "MultiExitNet", "__version__"]
