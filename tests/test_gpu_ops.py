"""The CUDA kernels where only a GPU can check them: built at all, bitwise repeatable, right past 2^31 elements
(64-bit indexing), clean under compute-sanitizer's memcheck, and add_noise's host-side timestep check. Parity with
the reference per dtype runs in tests/test_ops.py (its cuda cases). Run by scripts/gpu_check.sh; skipped without
CUDA."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreambooth_fast import ops

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def alphas_cumprod(device) -> torch.Tensor:
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).float().to(device)


def test_cuda_kernels_are_built():
    assert ops.native_status()["cuda"], "no CUDA kernels in dreambooth_fast._C: build with a CUDA torch and nvcc"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repeated_calls_are_bitwise_equal(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (8, 3, 256, 256)  # many blocks per row: the partial sums are added in a fixed order
    x0 = torch.randn(shape, generator=g, device="cuda").to(dtype)
    eps = torch.randn(shape, generator=g, device="cuda").to(dtype)
    t = torch.randint(0, 1000, (8,), generator=g, device="cuda")
    weights = torch.rand(4, generator=g, device="cuda")
    noise = [ops.add_noise(x0, eps, t, alphas_cumprod("cuda"), "v_prediction") for _ in range(3)]
    loss = [torch.ops.dreambooth_fast.dreambooth_loss(x0, eps, weights, 4, 0.7) for _ in range(3)]
    for first, again in [(noise[0], noise[1]), (noise[0], noise[2]), (loss[0], loss[1]), (loss[0], loss[2])]:
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 320, 64, 64), (4, 1280, 16, 16)], ids=["320x64px", "1280x16px"])
def test_group_norm_act_at_if_block_shapes_is_repeatable_and_matches_float64(shape, dtype):
    """IF-I-XL's ResNet blocks (32 groups, scale-shift, GELU): forward and backward bitwise the same on every call,
    and close to the float64 reference on the CPU."""
    from dreambooth_fast import reference

    g = torch.Generator(device="cuda").manual_seed(0)
    n, c = shape[:2]
    x = torch.randn(shape, generator=g, device="cuda").to(dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(c, generator=g, device="cuda")).requires_grad_()
    bias = (0.1 * torch.randn(c, generator=g, device="cuda")).requires_grad_()
    temb = (0.5 * torch.randn(n, 2 * c, 1, 1, generator=g, device="cuda")).to(dtype).requires_grad_()
    upstream = torch.randn(shape, generator=g, device="cuda").to(dtype)

    def run(fn, leaves):
        scale, shift = leaves[3].chunk(2, dim=1)
        y = fn(leaves[0], 32, leaves[1], leaves[2], scale=scale, shift=shift, act="gelu")
        return (y, *torch.autograd.grad(y, leaves, upstream.to(y.dtype).to(y.device)))

    results = [run(ops.group_norm_act, [x, weight, bias, temb]) for _ in range(3)]
    for again in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], again))
    exact = run(reference.group_norm_act, [t.detach().cpu().double().requires_grad_() for t in (x, weight, bias, temb)])
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype in (torch.float32, torch.float64) else {"rtol": 3e-2, "atol": 3e-2}
    for got, want in zip(results[0], exact):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double().cpu() / scale, want / scale, **tol)


def test_both_ops_are_right_past_2_pow_31_elements():
    # Two rows of 2^31 + 64 bfloat16 elements: each row alone is past 32-bit indexing. About 35 GB at the peak.
    rows, row_size, chunk = 2, 2**31 + 64, 2**28
    g = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randn(rows, row_size, generator=g, device="cuda", dtype=torch.bfloat16)
    eps = torch.randn(rows, row_size, generator=g, device="cuda", dtype=torch.bfloat16)
    ac = alphas_cumprod("cuda")
    t = torch.tensor([10, 900], device="cuda")
    x_t, v = ops.add_noise(x0, eps, t, ac, "v_prediction")
    a, s = ac[t].sqrt().tolist(), (1 - ac[t]).sqrt().tolist()
    bf16 = {"rtol": 2**-7, "atol": 2**-7}
    for row in range(rows):
        for start in range(0, row_size, chunk):
            cols = slice(start, start + chunk)
            x, e = x0[row, cols].float(), eps[row, cols].float()
            torch.testing.assert_close(x_t[row, cols].float(), a[row] * x + s[row] * e, **bf16)
            torch.testing.assert_close(v[row, cols].float(), a[row] * e - s[row] * x, **bf16)
    del x_t, v
    loss, grad, _ = torch.ops.dreambooth_fast.dreambooth_loss(x0, eps, None, 1, 0.5)
    coef = [1.0 / row_size, 0.5 / row_size]  # one subject row, one prior row
    expected = 0.0
    for row in range(rows):
        for start in range(0, row_size, chunk):
            cols = slice(start, start + chunk)
            diff = x0[row, cols].float() - eps[row, cols].float()
            expected += coef[row] * (diff.double() ** 2).sum().item()
            torch.testing.assert_close(grad[row, cols], 2 * coef[row] * diff, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss.double().item(), expected, **bf16)


def test_add_noise_checks_cpu_timesteps_before_the_device_assert_can_poison_the_context():
    x0 = torch.randn(3, 3, 8, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"add_noise: timesteps\[1\] = 1000 is outside the alphas_cumprod table"):
        ops.add_noise(x0, x0, torch.tensor([0, 1000, 5]), alphas_cumprod("cpu"), "epsilon")
    torch.cuda.synchronize()  # the context is still usable
    assert ops.add_noise(x0, x0, torch.tensor([0, 999, 5]), alphas_cumprod("cpu"))[0].shape == x0.shape


# Every dtype; the vectorised path (rows of 8*8) and the scalar one (rows of 7*5, and views one element off a
# 16-byte boundary); a strided pred with prior rows; the backward pass.
_MEMCHECK_CASE = """
import torch
from dreambooth_fast import ops

def shifted(rows, row, dtype):  # a [rows, row] view that starts one element past an allocation
    return torch.randn(rows * row + 1, device="cuda").to(dtype)[1:].view(rows, row)

ac = torch.linspace(0.999, 0.01, 1000, device="cuda")
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for rows, h, w in [(3, 8, 8), (5, 7, 5)]:
        t = torch.randint(0, 1000, (rows,), device="cuda")
        x0 = torch.randn(rows, 3, h, w, device="cuda").to(dtype)
        ops.add_noise(x0, torch.randn_like(x0), t, ac, "v_prediction")
        a, b = shifted(rows, 3 * h * w, dtype), shifted(rows, 3 * h * w, dtype)
        ops.add_noise(a, b, t, ac, "epsilon")
        torch.ops.dreambooth_fast.dreambooth_loss(a, b, None, rows, 1.0)
        out = torch.randn(rows, 6, h, w, device="cuda").to(dtype).requires_grad_()
        loss = ops.dreambooth_loss(out[:, :3], x0, torch.rand(2, device="cuda"), 2, 0.7)
        loss.backward(torch.tensor(3.0, device="cuda", dtype=dtype))
torch.cuda.synchronize()
print("memcheck case done")
"""


def test_compute_sanitizer_memcheck_finds_no_errors():
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.access(sanitizer, os.X_OK):
        pytest.skip("compute-sanitizer is not installed")
    done = subprocess.run([sanitizer, "--tool", "memcheck", "--error-exitcode", "1", sys.executable, "-c",
                           _MEMCHECK_CASE], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    output = done.stdout + done.stderr
    if "Device not supported" in output:  # e.g. a GPU passed through gVisor
        pytest.skip("compute-sanitizer does not support this device here: " + output.strip().splitlines()[-1])
    assert done.returncode == 0 and "memcheck case done" in output, output[-5000:]
    assert "ERROR SUMMARY: 0 errors" in output, output[-5000:]
