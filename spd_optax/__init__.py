"""Selective Projection Decay (Tian et al., NeurIPS 2024) for Optax."""

from spd_optax import adam
from spd_optax.adam import adam_spd
from spd_optax.layers import depth_scaled
from spd_optax.layers import layer_axes_from_names
from spd_optax.state import set_anchor
from spd_optax.state import spd_state
from spd_optax.state import spd_stats
from spd_optax.state import state_shardings
from spd_optax.transform import selective_projection_decay
from spd_optax.transform import SPDState

__version__ = "0.2.0"

__all__ = [
    "SPDState",
    "adam",
    "adam_spd",
    "depth_scaled",
    "layer_axes_from_names",
    "selective_projection_decay",
    "set_anchor",
    "spd_state",
    "spd_stats",
    "state_shardings",
]
