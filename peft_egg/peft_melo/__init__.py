"""peft_melo: MELO (neuron-indexed dynamic LoRA, Yu et al. AAAI 2024) on upstream peft's tuner classes.

Public API: :class:`MeloConfig`, :func:`get_melo_model`, :class:`MeloModel` (``edit``, routed
``forward``/``generate``, ``save_pretrained``/``from_pretrained``) and :class:`VectorDatabase`.
"""

from .config import MELO_PEFT_TYPE, MeloConfig
from .layer import Conv1D, Linear, MeloLayer
from .model import EditResult, MeloModel, NoBlockLeftError, get_melo_model, resolve_module_name
from .prefix_cache import FrozenPrefixCache, trainable_modules
from .routing import RoutingState
from .vector_database import NO_BLOCK, VectorDatabase

__all__ = [
    "MELO_PEFT_TYPE",
    "NO_BLOCK",
    "Conv1D",
    "EditResult",
    "FrozenPrefixCache",
    "Linear",
    "MeloConfig",
    "MeloLayer",
    "MeloModel",
    "NoBlockLeftError",
    "RoutingState",
    "VectorDatabase",
    "get_melo_model",
    "resolve_module_name",
    "trainable_modules",
]
