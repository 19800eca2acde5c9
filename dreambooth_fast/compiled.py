"""`--compile`: the UNet's forward through torch.compile (Inductor), its backward through AOTAutograd, in place (the
module, its parameters and its state_dict keys stay the same, so checkpoints and the output are unchanged).

Compilation happens at the first call of each new input shape or mode (training, validation), in the middle of a
run: if it fails there (no C++ compiler, an op Inductor cannot lower, ...), the run says so in one line and goes on
eagerly rather than stopping.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def compile_unet(unet: torch.nn.Module, stage: str) -> None:
    """Make `unet`'s forward a torch.compile'd one that falls back, for good, to the eager forward on failure."""
    eager = unet.forward
    compiled = torch.compile(eager)

    def forward(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # any failure of tracing, lowering or the C++ build
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            tqdm.write(f"--compile: torch.compile failed for the {stage} UNet ({reason[:200]}); training it eagerly")
            unet.forward = eager
            return eager(*args, **kwargs)

    unet.forward = forward
