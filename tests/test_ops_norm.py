"""The fused GroupNorm + scale-shift + activation op (ops.group_norm_act) against its plain-PyTorch reference
(diffusers' ResnetBlock2D chain: group_norm, `* (1 + scale) + shift`, GELU or SiLU), in the style of test_ops.py:
odd shapes, every dtype and activation, with and without scale-shift; gradients of x, weight, bias, scale and shift
against autograd of the reference under a random upstream gradient; float64 gradcheck; opcheck;
torch.compile(fullgraph=True); channels_last and strided inputs; thread-count determinism; bad arguments.
The half-precision rule is test_ops.py's (at most twice eager PyTorch's error against float64, plus one ulp).
"""

import os
import subprocess
import sys

import pytest
import torch
from test_ops import DEVICE_PARAMS, DTYPES, assert_close_for_dtype, needs_native, random_like

from dreambooth_fast import ops, reference

pytestmark = needs_native

ACTS = ["gelu", "silu", "identity"]
# (shape, groups): IF's 32 groups at a small size, the default model's 8, a group of one channel, a 3-D x, and a
# size with many parallel tasks and vector tails.
SHAPES = [((3, 6, 7, 5), 3), ((2, 32, 9, 11), 8), ((2, 4, 5, 3), 4), ((3, 8, 13), 2), ((2, 64, 33, 31), 32)]
SHAPE_IDS = ["odd", "groups8", "one-channel-groups", "3d", "large"]


def norm_inputs(shape, groups, dtype, device, scale_shift=True, seed=0):
    """x, weight, bias and the [N, C, 1, ...] scale and shift chunks of a diffusers time embedding (or None)."""
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]

    def rand(*size, mean=0.0, std=1.0):
        return (torch.randn(size, generator=g, dtype=torch.float64) * std + mean).to(device, dtype)

    x = rand(*shape, mean=0.5, std=2.0)
    weight, bias = rand(c, mean=1.0, std=0.3), rand(c, std=0.3)
    if not scale_shift:
        return x, weight, bias, None, None
    temb = rand(n, 2 * c, *([1] * (len(shape) - 2)), std=0.5)
    scale, shift = temb.chunk(2, dim=1)  # strided views, as in ResnetBlock2D
    return x, weight, bias, scale, shift


def assert_close(fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor) -> None:
    """test_ops.py's rule, except in float32 where the reference is float64: the parameter gradients are sums over
    whole channels (of ~1000 terms here), whose float32 rounding is a few ulps of the largest value."""
    if fused.dtype != torch.float32:
        assert_close_for_dtype(fused, eager, exact)
        return
    assert fused.shape == eager.shape
    atol = 8 * torch.finfo(torch.float32).eps * exact.abs().max().item()
    torch.testing.assert_close(fused.double(), exact, rtol=1e-5, atol=atol)


def run(fn, x, groups, weight, bias, scale, shift, act):
    return fn(x, groups, weight, bias, 1e-5, scale=scale, shift=shift, act=act)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("scale_shift", [True, False], ids=["scale-shift", "plain"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize(("shape", "groups"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_act_matches_reference(dtype, shape, groups, act, scale_shift, device):
    inputs = norm_inputs(shape, groups, dtype, device, scale_shift)
    fused = run(ops.group_norm_act, inputs[0], groups, *inputs[1:], act)
    eager = run(reference.group_norm_act, inputs[0], groups, *inputs[1:], act)
    exact = run(reference.group_norm_act, inputs[0].double(), groups,
                *[None if t is None else t.double() for t in inputs[1:]], act)
    assert_close(fused, eager, exact)


def _grads(fn, inputs, groups, act, dtype):
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs]
    y = run(fn, leaves[0], groups, *leaves[1:], act)
    wanted = [t for t in leaves if t is not None]
    return torch.autograd.grad(y, wanted, random_like(y, 7).to(dtype))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("scale_shift", [True, False], ids=["scale-shift", "plain"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize(("shape", "groups"), SHAPES[:2] + SHAPES[4:], ids=SHAPE_IDS[:2] + SHAPE_IDS[4:])
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_act_gradients_match_reference_autograd(dtype, shape, groups, act, scale_shift, device):
    inputs = norm_inputs(shape, groups, dtype, device, scale_shift)
    exact = _grads(reference.group_norm_act, inputs, groups, act, torch.float64)
    fused = _grads(ops.group_norm_act, inputs, groups, act, dtype)
    eager = _grads(reference.group_norm_act, inputs, groups, act, dtype)
    for f, e, x in zip(fused, eager, exact, strict=True):
        assert_close(f, e, x)


@pytest.mark.parametrize("act", ACTS)
def test_group_norm_act_gradcheck_float64(act):
    x, weight, bias, scale, shift = norm_inputs((2, 6, 3, 4), 3, torch.float64, "cpu")
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, scale, shift)]
    assert torch.autograd.gradcheck(
        lambda x_, w, b, sc, sh: ops.group_norm_act(x_, 3, w, b, 1e-5, scale=sc, shift=sh, act=act), leaves
    )


def test_group_norm_act_gradcheck_float64_without_scale_shift():
    x, weight, bias, _, _ = norm_inputs((2, 6, 3, 4), 2, torch.float64, "cpu", scale_shift=False)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(lambda x_, w, b: ops.group_norm_act(x_, 2, w, b, act="silu"), leaves)


def test_group_norm_act_takes_channels_last_and_strided_inputs():
    x, weight, bias, scale, shift = norm_inputs((2, 8, 6, 5), 4, torch.float32, "cpu")
    want = ops.group_norm_act(x, 4, weight, bias, scale=scale, shift=shift)
    torch.testing.assert_close(
        ops.group_norm_act(x.to(memory_format=torch.channels_last), 4, weight, bias, scale=scale, shift=shift), want,
        rtol=0, atol=0,
    )
    wide = torch.cat([x, x], dim=3)[..., :5]
    assert not wide.is_contiguous()
    torch.testing.assert_close(ops.group_norm_act(wide, 4, weight, bias, scale=scale, shift=shift), want, rtol=0,
                               atol=0)


def test_group_norm_act_is_deterministic_across_thread_counts():
    inputs = norm_inputs((4, 32, 33, 31), 8, torch.float32, "cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            results.append((run(ops.group_norm_act, inputs[0], 8, *inputs[1:], "gelu"),
                            *_grads(ops.group_norm_act, inputs, 8, "gelu", torch.float32)))
    finally:
        torch.set_num_threads(threads)
    for again in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], again, strict=True))


def test_group_norm_act_saves_only_x_the_parameters_and_per_group_statistics():
    x, weight, bias, scale, shift = norm_inputs((2, 8, 6, 5), 4, torch.float32, "cpu")
    x.requires_grad_()
    _, mean, rstd = torch.ops.dreambooth_fast.group_norm_act(x, weight, bias, scale.reshape(2, 8),
                                                             shift.reshape(2, 8), 4, 1e-5, "gelu")
    assert mean.shape == rstd.shape == (2, 4) and mean.dtype == rstd.dtype == torch.float32
    y = ops.group_norm_act(x, 4, weight, bias, scale=scale, shift=shift)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert sum(t.numel() for t in saved) == x.numel() + 2 * 8 + 2 * 2 * 8 + 2 * 2 * 4


# --- registration: opcheck, torch.compile -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("scale_shift", [True, False], ids=["scale-shift", "plain"])
def test_group_norm_act_passes_opcheck(scale_shift, dtype):
    x, weight, bias, scale, shift = norm_inputs((2, 6, 5, 3), 3, dtype, "cpu", scale_shift)
    scale = None if scale is None else scale.reshape(2, 6).requires_grad_()
    shift = None if shift is None else shift.reshape(2, 6).contiguous().requires_grad_()
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), scale, shift, 3, 1e-5, "gelu")
    torch.library.opcheck(torch.ops.dreambooth_fast.group_norm_act.default, args)


def test_group_norm_act_backward_passes_opcheck():
    x, weight, bias, scale, shift = norm_inputs((2, 6, 5, 3), 3, torch.float32, "cpu")
    scale, shift = scale.reshape(2, 6), shift.reshape(2, 6)
    _, mean, rstd = torch.ops.dreambooth_fast.group_norm_act(x, weight, bias, scale, shift, 3, 1e-5, "silu")
    args = (torch.randn_like(x), x, weight, bias, scale, shift, mean, rstd, 3, "silu")
    torch.library.opcheck(torch.ops.dreambooth_fast.group_norm_act_backward.default, args)


def test_group_norm_act_compiles_with_fullgraph():
    torch._dynamo.reset()

    def block(x, weight, bias, temb):
        scale, shift = temb.chunk(2, dim=1)
        return ops.group_norm_act(x, 3, weight, bias, scale=scale, shift=shift).square().mean()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x, weight, bias, scale, shift = norm_inputs((2, 6, 5, 3), 3, torch.float32, "cpu")
    temb = torch.cat([scale, shift], dim=1)
    results = []
    for fn in (compiled, block):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, temb)]
        loss = fn(*leaves)
        results.append((loss, *torch.autograd.grad(loss, leaves)))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


# --- the CPU kernels for CPUs without AVX2 ----------------------------------------------------------------------

_DEFAULT_KERNELS_CHECK = """
import torch
from dreambooth_fast import _C, ops, reference
assert _C.cpu_kernels == "DEFAULT", _C.cpu_kernels
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=2e-2)
    for act in ("gelu", "silu", "identity"):
        x = torch.randn(3, 8, 9, 7, generator=g).to(dtype).requires_grad_()
        w, b, temb = torch.randn(8, generator=g), torch.randn(8, generator=g), torch.randn(3, 16, generator=g)
        sc, sh = temb.to(dtype).chunk(2, dim=1)
        y = ops.group_norm_act(x, 4, w, b, scale=sc, shift=sh, act=act)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        x64 = x.detach().double().requires_grad_()
        y64 = reference.group_norm_act(x64, 4, w.double(), b.double(), scale=sc.double(), shift=sh.double(), act=act)
        (gx64,) = torch.autograd.grad(y64, x64, torch.ones_like(y64))
        torch.testing.assert_close(y.double(), y64, **tol)
        torch.testing.assert_close(gx.double(), gx64, **tol)
"""


@pytest.mark.skipif(ops.native_cpu_kernels() != "AVX2", reason="only one kind of CPU kernels on this machine")
def test_default_cpu_kernels_match_reference():
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    done = subprocess.run([sys.executable, "-c", _DEFAULT_KERNELS_CHECK], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


# --- bad arguments: clear errors from the C++ side --------------------------------------------------------------


def _norm_args(**change):
    x, weight, bias, scale, shift = norm_inputs((2, 6, 5, 3), 3, torch.float32, "cpu")
    args = {"x": x, "groups": 3, "weight": weight, "bias": bias, "scale": scale, "shift": shift, "act": "gelu"}
    return {**args, **change}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"groups": 4}, r"group_norm_act: groups must divide the channels C = 6, got 4"),
        ({"weight": torch.ones(5)}, r"group_norm_act: weight must have shape \[C\] = \[6\], got \[5\]"),
        ({"bias": torch.ones(6, dtype=torch.int64)}, r"group_norm_act: bias must be a float tensor"),
        ({"scale": torch.ones(3, 6)}, r"shape '\[2, 6\]' is invalid for input of size 18"),
        ({"x": torch.zeros(2, 6, 5, 3, dtype=torch.int32)}, r"group_norm_act: x must be float32, float64"),
        ({"x": torch.zeros(2, 6, 0, 3)}, r"group_norm_act: x must be a non-empty \[N, C, \*\] tensor"),
    ],
    ids=["groups", "weight-shape", "bias-dtype", "scale-size", "x-dtype", "x-empty"],
)
def test_group_norm_act_rejects_bad_arguments(change, message):
    with pytest.raises(RuntimeError, match=message):
        ops.group_norm_act(**_norm_args(**change))


def test_group_norm_act_rejects_an_unknown_activation():
    with pytest.raises(ValueError, match="act must be one of gelu, silu, identity, got 'relu'"):
        ops.group_norm_act(**_norm_args(act="relu"))
    with pytest.raises(RuntimeError, match="group_norm_act: act must be 'gelu', 'silu' or 'identity', got 'relu'"):
        torch.ops.dreambooth_fast.group_norm_act(torch.ones(1, 2, 3), torch.ones(2), torch.ones(2), None, None, 1,
                                                 1e-5, "relu")
