"""fuse_resnet_norms: a UNet whose ResnetBlock2D chains run as ops.group_norm_act gives the unpatched UNet's output
and parameter gradients (tiny IF-shaped UNets: GELU and SiLU, time_embedding_norm "scale_shift" and "default"):
exactly in float64, and in float32 and under bf16 autocast as close to float64 as the unpatched UNet. It keeps the
parameters and state_dict keys, and leaves blocks whose nonlinearity the op does not have as they were."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D
from test_ops import needs_native

from dreambooth_fast.fused_norm import FusedNormResnetBlock2D, fuse_resnet_norms
from dreambooth_fast.toy.if_layout import if_unet_config

pytestmark = needs_native

TEXT_DIM = 16


def tiny_unet(act_fn: str, time_embedding_norm: str, seed: int = 0) -> UNet2DConditionModel:
    """Two levels (a ResNet level with downsampling, a cross-attention level), 8 groups of 2-4 channels."""
    torch.manual_seed(seed)
    config = if_unet_config(16, [16, 32], [False, True], text_dim=TEXT_DIM, attention_head_dim=8,
                            norm_num_groups=8, act_fn=act_fn, resnet_time_scale_shift=time_embedding_norm)
    unet = UNet2DConditionModel(**config)
    # diffusers zero-initialises nothing here, but random weights of a fresh UNet give small activations: make the
    # norms' affine parameters non-trivial so that their gradients are checked on real values.
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return unet


def unet_inputs(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64).to(dtype)
    timesteps = torch.tensor([10, 500, 999])
    text = torch.randn(3, 5, TEXT_DIM, generator=g, dtype=torch.float64).to(dtype)
    return x, timesteps, text


def output_and_grads(unet, dtype, autocast: torch.dtype | None = None):
    x, timesteps, text = unet_inputs(dtype)
    unet.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
        out = unet(x, timesteps, encoder_hidden_states=text).sample
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out.float().backward(upstream.to(out.device, torch.float32) if out.dtype != torch.float64 else upstream)
    return out.detach(), {name: p.grad.detach().clone() for name, p in unet.named_parameters() if p.grad is not None}


def error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return (got.double() - exact).norm().item()


CHAINS = [("gelu", "scale_shift"), ("silu", "scale_shift"), ("gelu", "default"), ("silu", "default")]
CHAIN_IDS = ["gelu-scale-shift", "silu-scale-shift", "gelu-default", "silu-default"]


@pytest.mark.parametrize(("act_fn", "time_embedding_norm"), CHAINS, ids=CHAIN_IDS)
def test_fused_unet_matches_the_unpatched_unet_in_float64(act_fn, time_embedding_norm):
    eager = tiny_unet(act_fn, time_embedding_norm).double()
    fused = copy.deepcopy(eager)
    blocks = sum(type(m) is ResnetBlock2D for m in eager.modules())
    assert fuse_resnet_norms(fused) == blocks > 0
    assert all(type(m) is not ResnetBlock2D for m in fused.modules())
    want_out, want_grads = output_and_grads(eager, torch.float64)
    got_out, got_grads = output_and_grads(fused, torch.float64)
    torch.testing.assert_close(got_out, want_out, rtol=1e-9, atol=1e-10)
    assert got_grads.keys() == want_grads.keys() == {name for name, _ in eager.named_parameters()}
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(("act_fn", "time_embedding_norm"), [CHAINS[0], CHAINS[3]], ids=[CHAIN_IDS[0], CHAIN_IDS[3]])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["float32", "bf16-autocast"])
def test_fused_unet_is_as_close_to_float64_as_the_unpatched_unet(autocast, act_fn, time_embedding_norm):
    """In float32, and under bf16 autocast as --precision bf16 trains, the fused chains (float32 math, one rounding)
    may be at most twice as far from the float64 UNet as the unpatched UNet is (flash-attention's rule, on L2
    norms of the errors; the gradients as one vector), or within 1e-5 of it relative (float32 rounding). Gradients
    that are zero in exact
    arithmetic (the attention pool's key bias: softmax ignores a constant shift) are rounding noise on both sides,
    where the eager error is as large as the value itself: those are not compared."""
    exact_out, exact_grads = output_and_grads(tiny_unet(act_fn, time_embedding_norm).double(), torch.float64)
    eager = tiny_unet(act_fn, time_embedding_norm)
    fused = copy.deepcopy(eager)
    fuse_resnet_norms(fused)
    eager_out, eager_grads = output_and_grads(eager, torch.float32, autocast)
    fused_out, fused_grads = output_and_grads(fused, torch.float32, autocast)
    assert fused_out.dtype == eager_out.dtype
    assert error(fused_out, exact_out) <= max(2 * error(eager_out, exact_out), 1e-5 * exact_out.norm().item())
    compared = [name for name, exact in exact_grads.items() if error(eager_grads[name], exact) <= exact.norm() / 2]
    assert len(compared) >= 0.95 * len(exact_grads)
    exact = torch.cat([exact_grads[name].flatten() for name in compared])
    fused_err = error(torch.cat([fused_grads[name].flatten() for name in compared]), exact)
    eager_err = error(torch.cat([eager_grads[name].flatten() for name in compared]), exact)
    assert fused_err <= max(2 * eager_err, 1e-5 * exact.norm().item()), f"fused {fused_err} vs eager {eager_err}"


def test_fusing_keeps_parameters_and_state_dict_and_skips_other_activations():
    unet = tiny_unet("gelu", "scale_shift")
    before = {name: p for name, p in unet.named_parameters()}
    keys = list(unet.state_dict())
    fuse_resnet_norms(unet)
    assert {name: p for name, p in unet.named_parameters()} == before and list(unet.state_dict()) == keys
    assert fuse_resnet_norms(unet) == 0  # already fused

    mish = tiny_unet("mish", "scale_shift")
    assert fuse_resnet_norms(mish) == 0
    assert not any(isinstance(m, FusedNormResnetBlock2D) for m in mish.modules())
