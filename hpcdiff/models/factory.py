"""The objective a config names.

Kept apart from ``objective.py`` (the interface) so the interface never imports its implementations: flow.py and
diffusion.py import objective.py, and this module imports them.
"""

from __future__ import annotations

import logging

from hpcdiff.models.diffusion import DDPM
from hpcdiff.models.flow import FlowMatching
from hpcdiff.models.objective import Objective, ObjectiveConfig

log = logging.getLogger(__name__)


def build_objective(cfg: ObjectiveConfig) -> Objective:
    """The objective named by ``cfg.kind``."""
    if cfg.kind == "flow":
        defaults = ObjectiveConfig(kind="flow")
        ignored = [k for k in ("schedule", "prediction", "num_timesteps") if getattr(cfg, k) != getattr(defaults, k)]
        if ignored:
            log.warning("objective.%s ignored: flow matching has no noise schedule", ", objective.".join(ignored))
        return FlowMatching()
    return DDPM(schedule=cfg.schedule, prediction=cfg.prediction, num_timesteps=cfg.num_timesteps)
