"""Which Adam runs the update: torch's fused Adam (one kernel over all parameters) where torch has one for the
parameters' device, else foreach Adam (one kernel per op over lists of tensors); never the per-parameter loop
(about 300 small calls per step on the default model: 14% of its step on a CPU, BENCHMARKS.md "Step profile").

The implementation belongs to the machine, not to the checkpoint: Adam's saved state (step, both moments) is the
same for all three, and loading it keeps the choice made here, so a run saved by any of them resumes, and a run
resumed with the implementation it was saved with continues bit for bit.
"""

from __future__ import annotations

import torch

# Devices torch ships a fused Adam kernel for, among those dreambooth-fast runs on.
FUSED_DEVICES = ("cpu", "cuda")


def adam_options(params: list[torch.Tensor]) -> dict[str, bool]:
    """torch.optim.Adam's keyword for the fastest implementation these parameters allow: fused or foreach."""
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return {"fused": True} if fused else {"foreach": True}


def adam_implementation(optimizer: torch.optim.Optimizer) -> str:
    """'fused', 'foreach' or 'per-parameter': what the optimizer's first parameter group runs."""
    group = optimizer.param_groups[0]
    return "fused" if group.get("fused") else "foreach" if group.get("foreach") else "per-parameter"


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state, keeping this optimizer's implementation (the saved groups carry the flags of
    the one that wrote them)."""
    chosen = [{key: group[key] for key in ("fused", "foreach") if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, chosen):
        group.update(flags)
