"""The Adam the trainer runs: fused where torch has a kernel for the device, else foreach; a saved state loads
into any of them (resume bit for bit with each is in test_train.py)."""

import copy

import torch

from dreambooth_fast.optim import adam_implementation, adam_options, load_optimizer_state


def params(device: str = "cpu") -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(device)) for shape in [(5, 3), (7,), (2, 2)]]


def steps(optimizer: torch.optim.Optimizer, n: int) -> None:
    for i in range(n):
        for p in optimizer.param_groups[0]["params"]:
            p.grad = torch.full_like(p, 0.1 * (i + 1)) + p.detach()
        optimizer.step()


def test_adam_is_fused_on_the_cpu_and_foreach_where_torch_has_no_fused_kernel():
    assert adam_options(params()) == {"fused": True}
    assert adam_options(params("meta")) == {"foreach": True}
    assert adam_implementation(torch.optim.Adam(params(), **adam_options(params()))) == "fused"
    assert adam_implementation(torch.optim.Adam(params(), foreach=False)) == "per-parameter"


def test_a_state_saved_by_another_adam_loads_and_keeps_this_ones_implementation():
    old = torch.optim.Adam(params(), lr=1e-2, foreach=False)  # what dbfast ran before the choice existed
    steps(old, 3)
    resumed = torch.optim.Adam([p.detach().clone().requires_grad_() for p in old.param_groups[0]["params"]],
                               lr=1e-2, fused=True)
    load_optimizer_state(resumed, copy.deepcopy(old.state_dict()))  # as read from a checkpoint
    assert adam_implementation(resumed) == "fused"
    steps(old, 2)
    steps(resumed, 2)
    for a, b in zip(old.param_groups[0]["params"], resumed.param_groups[0]["params"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
