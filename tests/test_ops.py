"""The fused ops against the plain-PyTorch reference (diffusers' math), in the style of pytorch/extension-cpp and
Liger-Kernel: fresh random inputs of odd shapes for every dtype and prediction type, with and without prior rows
and weights; gradients against autograd of the reference under a random upstream gradient; float64 gradcheck;
torch.library.opcheck; torch.compile(fullgraph=True); strided pred; determinism; bad arguments.

Half-precision rule (flash-attention's): the fused result's error against the float64 reference is at most twice
eager PyTorch's error in the same dtype, plus one unit in the last place of the largest value.
"""

import os
import subprocess
import sys

import pytest
import torch

from dreambooth_fast import ops, reference

DTYPES = [
    pytest.param(dtype, id=str(dtype).removeprefix("torch."))
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
]
PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]
SHAPES = [(3, 3, 7, 5), (5, 3, 17, 9)]
LARGE = (4, 3, 67, 61)  # more than one parallel task and reduction chunk per row
# (n_instance, weighted): all rows subject rows or a subject half plus prior rows, with and without weights.
LOSS_CASES = [(None, False), (None, True), ("half", False), ("half", True)]
LOSS_CASE_IDS = ["subject", "subject-weighted", "prior", "prior-weighted"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

needs_native = pytest.mark.skipif(not ops.native_status()["cpu"], reason="the native CPU ops are not built")
pytestmark = needs_native


def _device_param(device: str):
    marks = [pytest.mark.gpu] if device == "cuda" else []
    return pytest.param(device, marks=marks, id=device)


DEVICE_PARAMS = [_device_param(d) for d in DEVICES]


def alphas_cumprod(device="cpu") -> torch.Tensor:
    """IF's schedule (squaredcos_cap_v2, 1000 steps), float32 as DDPMScheduler keeps it."""
    steps = torch.arange(1001, dtype=torch.float64) / 1000
    f = torch.cos((steps + 0.008) / 1.008 * torch.pi / 2) ** 2
    betas = torch.clamp(1 - f[1:] / f[:-1], max=0.999)
    return torch.cumprod(1 - betas, 0).float().to(device)


def noise_inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    eps = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    timesteps = torch.randint(0, 1000, (shape[0],), generator=g).to(device)
    return x0, eps, timesteps


def loss_inputs(shape, dtype, device, case, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    target = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    n_instance, weighted = case
    n_instance = (shape[0] + 1) // 2 if n_instance == "half" else None
    rows = shape[0] if n_instance is None else n_instance
    weights = (torch.rand(rows, generator=g) * 2).to(device) if weighted else None
    return pred, target, weights, n_instance


def assert_close_for_dtype(fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor) -> None:
    """fused vs eager in the same dtype, with exact = the float64 reference."""
    assert fused.dtype == eager.dtype and fused.shape == eager.shape
    if fused.dtype == torch.float64:
        torch.testing.assert_close(fused, exact, rtol=1e-12, atol=1e-12)
    elif fused.dtype == torch.float32:
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    else:
        fused_err = (fused.double() - exact).abs().max().item()
        eager_err = (eager.double() - exact).abs().max().item()
        ulp = torch.finfo(fused.dtype).eps * exact.abs().max().item()
        assert fused_err <= 2 * eager_err + ulp, f"{fused.dtype}: fused error {fused_err} vs eager {eager_err}"


def random_like(t: torch.Tensor, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)


# --- add_noise --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("shape", SHAPES + [LARGE], ids=str)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_noise_matches_reference(dtype, prediction_type, shape, device):
    x0, eps, t = noise_inputs(shape, dtype, device)
    ac = alphas_cumprod(device)
    fused = ops.add_noise(x0, eps, t, ac, prediction_type)
    eager = reference.add_noise(x0, eps, t, ac, prediction_type)
    exact = reference.add_noise(x0.double(), eps.double(), t, ac.double(), prediction_type)
    for f, e, x in zip(fused, eager, exact):
        assert_close_for_dtype(f, e, x)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_add_noise_target_is_the_input_itself_for_epsilon_and_sample(prediction_type, device):
    x0, eps, t = noise_inputs((3, 3, 7, 5), torch.float32, device)
    _, target = ops.add_noise(x0, eps, t, alphas_cumprod(device), prediction_type)
    if prediction_type == "v_prediction":
        assert target.data_ptr() not in (x0.data_ptr(), eps.data_ptr())
    else:
        assert target is (eps if prediction_type == "epsilon" else x0)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_noise_gradients_match_reference_autograd(dtype, prediction_type, device):
    x0, eps, t = noise_inputs((5, 3, 17, 9), dtype, device)
    ac = alphas_cumprod(device)

    def grads(fn, dtype_):
        a = x0.to(dtype_).requires_grad_()
        b = eps.to(dtype_).requires_grad_()
        x_t, target = fn(a, b, t, ac, prediction_type)
        upstream = (random_like(x_t, 2).to(dtype_), random_like(target, 3).to(dtype_))
        return torch.autograd.grad((x_t, target), (a, b), upstream)

    exact = grads(reference.add_noise, torch.float64)
    for f, e, x in zip(grads(ops.add_noise, dtype), grads(reference.add_noise, dtype), exact):
        assert_close_for_dtype(f, e, x)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_add_noise_gradcheck_float64(prediction_type):
    x0, eps, t = noise_inputs((3, 2, 5, 3), torch.float64, "cpu")
    ac = alphas_cumprod()
    assert torch.autograd.gradcheck(
        lambda a, b: ops.add_noise(a, b, t, ac, prediction_type), (x0.requires_grad_(), eps.requires_grad_())
    )


def test_add_noise_accepts_non_contiguous_inputs_and_int32_timesteps():
    x0, eps, t = noise_inputs((5, 3, 17, 9), torch.float32, "cpu")
    ac = alphas_cumprod()
    x0_t, eps_t = x0.transpose(2, 3), eps.transpose(2, 3)
    fused = ops.add_noise(x0_t, eps_t, t.int(), ac, "v_prediction")
    eager = reference.add_noise(x0_t, eps_t, t, ac, "v_prediction")
    for f, e in zip(fused, eager):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-6)
        assert f.is_contiguous()


# --- dreambooth_loss --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_CASE_IDS)
@pytest.mark.parametrize("shape", SHAPES + [LARGE], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dreambooth_loss_matches_reference(dtype, shape, case, device):
    pred, target, weights, n_instance = loss_inputs(shape, dtype, device, case)
    fused = ops.dreambooth_loss(pred, target, weights, n_instance, 0.7)
    eager = reference.dreambooth_loss(pred, target, weights, n_instance, 0.7)
    w64 = None if weights is None else weights.double()
    exact = reference.dreambooth_loss(pred.double(), target.double(), w64, n_instance, 0.7)
    assert fused.shape == () and fused.dtype == dtype
    assert_close_for_dtype(fused, eager, exact)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dreambooth_loss_gradients_match_reference_autograd(dtype, case, device):
    pred, target, weights, n_instance = loss_inputs((5, 3, 17, 9), dtype, device, case)
    upstream = torch.tensor(-1.7)  # a random upstream gradient, not 1

    def grads(fn, dtype_):
        p = pred.to(dtype_).requires_grad_()
        y = target.to(dtype_).requires_grad_()
        w = None if weights is None else weights.to(torch.float64 if dtype_ == torch.float64 else torch.float32)
        loss = fn(p, y, w, n_instance, 0.7)
        return torch.autograd.grad(loss, (p, y), upstream.to(device, dtype_))

    exact = grads(reference.dreambooth_loss, torch.float64)
    for f, e, x in zip(grads(ops.dreambooth_loss, dtype), grads(reference.dreambooth_loss, dtype), exact):
        assert_close_for_dtype(f, e, x)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_CASE_IDS)
@pytest.mark.parametrize("shape", SHAPES + [LARGE], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dreambooth_loss_parts_match_reference_and_sum_to_the_loss(dtype, shape, case, device):
    pred, target, weights, n_instance = loss_inputs(shape, dtype, device, case)
    loss, parts = ops.dreambooth_loss_with_parts(pred, target, weights, n_instance, 0.7)
    eager_loss, eager_parts = reference.dreambooth_loss_with_parts(pred, target, weights, n_instance, 0.7)
    w64 = None if weights is None else weights.double()
    _, exact = reference.dreambooth_loss_with_parts(pred.double(), target.double(), w64, n_instance, 0.7)
    assert parts.shape == (2,) and parts.dtype == dtype and not parts.requires_grad
    assert_close_for_dtype(parts, eager_parts, exact)
    # The loss is the one dreambooth_loss returns, bit for bit, and its two parts add up to it.
    assert torch.equal(loss, ops.dreambooth_loss(pred, target, weights, n_instance, 0.7))
    assert_close_for_dtype(parts.double().sum().to(dtype), eager_loss, exact.sum())
    if n_instance is None:
        assert parts[1] == 0  # no prior rows


def test_dreambooth_loss_prior_part_is_lambda_times_the_prior_rows_mean_squared_error():
    pred, target, weights, n_instance = loss_inputs((5, 3, 17, 9), torch.float64, "cpu", ("half", True))
    _, parts = ops.dreambooth_loss_with_parts(pred, target, weights, n_instance, 0.7)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    subject = (per_sample[:n_instance] * weights.double()).mean()
    prior = 0.7 * per_sample[n_instance:].mean()
    torch.testing.assert_close(parts, torch.stack([subject, prior]), rtol=1e-12, atol=0)


# IF's two stages: D = 3*64*64 = 12288 and 3*256*256 = 196608, so 2c(P - Y) ~ 1e-5 and 1e-6: float16 subnormals.
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("shape", [(4, 3, 64, 64), (4, 3, 256, 256)], ids=["64px", "256px"])
def test_dreambooth_loss_float16_gradient_under_a_loss_scale_matches_float32_autograd(shape, device):
    # fp16 training scales the loss (GradScaler: 2^16, halved at each overflow; 2^16 itself overflows a float16
    # loss, so 2^15). The gradient must be the float32 gradient times the scale, rounded once to float16, as
    # autograd of the reference gives it; not a float16 buffer of subnormals multiplied afterwards.
    pred, target, _, n_instance = loss_inputs(shape, torch.float16, device, ("half", False))
    scale = 2.0**15
    p = pred.requires_grad_()
    (fused,) = torch.autograd.grad(ops.dreambooth_loss(p, target, None, n_instance, 0.7), p,
                                   torch.tensor(scale, dtype=torch.float16, device=device))
    p32 = pred.detach().float().requires_grad_()
    (exact,) = torch.autograd.grad(reference.dreambooth_loss(p32, target.float(), None, n_instance, 0.7), p32,
                                   torch.tensor(scale, device=device))
    assert fused.dtype == torch.float16
    # One rounding of the float32 value: at most one unit in the last place (relative 2^-10), or float16's
    # smallest subnormal for values that small.
    torch.testing.assert_close(fused.float(), exact, rtol=2.0**-10, atol=2.0**-24)


def test_dreambooth_loss_gradient_buffer_is_float32_for_half_pred_and_backward_returns_pred_dtype():
    op = torch.ops.dreambooth_fast.dreambooth_loss
    for dtype in (torch.float16, torch.bfloat16):
        pred, target, weights, n_instance = loss_inputs((5, 3, 17, 9), dtype, "cpu", ("half", True))
        loss, buffer, _ = op(pred, target, weights, n_instance, 0.7)
        assert loss.dtype == dtype and buffer.dtype == torch.float32
        p = pred.requires_grad_()
        (grad,) = torch.autograd.grad(ops.dreambooth_loss(p, target, weights, n_instance, 0.7), p)
        assert grad.dtype == dtype
        torch.testing.assert_close(grad, buffer.to(dtype), rtol=0, atol=0)  # upstream 1: the buffer, rounded once


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_dreambooth_loss_backward_with_unit_upstream_returns_the_forward_buffer(device):
    # The "upstream gradient is 1" shortcut, on every device: the float32 gradient is the buffer itself, no pass.
    pred, target, weights, n_instance = loss_inputs((5, 3, 17, 9), torch.float32, device, ("half", True))
    op = torch.ops.dreambooth_fast.dreambooth_loss
    p = pred.requires_grad_()
    loss, buffer, _ = op(p, target, weights, n_instance, 0.7)
    (grad,) = torch.autograd.grad(loss, p)
    assert grad.data_ptr() == buffer.data_ptr()
    loss, buffer, _ = op(p, target, weights, n_instance, 0.7)
    (grad,) = torch.autograd.grad(loss, p, torch.tensor(2.0, device=device))
    assert grad.data_ptr() != buffer.data_ptr()
    torch.testing.assert_close(grad, 2 * buffer, rtol=0, atol=0)


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_CASE_IDS)
def test_dreambooth_loss_gradcheck_float64(case):
    pred, target, weights, n_instance = loss_inputs((3, 2, 5, 3), torch.float64, "cpu", case)
    assert torch.autograd.gradcheck(
        lambda p, y: ops.dreambooth_loss(p, y, weights, n_instance, 0.7),
        (pred.requires_grad_(), target.requires_grad_()),
    )


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dreambooth_loss_takes_the_epsilon_half_of_a_6_channel_output(dtype, device):
    g = torch.Generator().manual_seed(0)
    out = torch.randn(5, 6, 17, 9, generator=g).to(device, dtype)
    target = torch.randn(5, 3, 17, 9, generator=g).to(device, dtype)
    weights = torch.rand(3, generator=g).to(device)
    results = []
    for fn in (ops.dreambooth_loss, reference.dreambooth_loss):
        o = out.clone().requires_grad_()
        pred = o[:, :3]
        assert not pred.is_contiguous()
        loss = fn(pred, target, weights, 3, 0.5)
        loss.backward(torch.tensor(2.5, dtype=dtype, device=device))
        results.append((loss, o.grad))
    (fused_loss, fused_grad), (eager_loss, eager_grad) = results
    assert torch.equal(fused_grad[:, 3:], torch.zeros_like(fused_grad[:, 3:]))
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype in (torch.float32, torch.float64) else {"rtol": 2e-2, "atol": 1e-3}
    torch.testing.assert_close(fused_loss, eager_loss, **tol)
    torch.testing.assert_close(fused_grad, eager_grad, **tol)


def test_dreambooth_loss_backward_with_unit_upstream_retained_graph_and_shared_pred():
    # An upstream gradient of exactly 1 reuses the gradient buffer of the forward pass: it must stay intact when the
    # graph is kept for a second backward and when two losses of one pred add their gradients.
    pred, target, weights, n_instance = loss_inputs((5, 3, 17, 9), torch.float32, "cpu", ("half", True))
    grads = []
    for fn in (ops.dreambooth_loss, reference.dreambooth_loss):
        p = pred.clone().requires_grad_()
        loss = fn(p, target, weights, n_instance, 0.7)
        loss.backward(retain_graph=True)
        loss.backward()
        (fn(p, target, None, None, 1.0) + fn(p, target, weights, n_instance, 0.7)).backward()
        grads.append(p.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_dreambooth_loss_accepts_any_layout():
    pred, target, weights, n_instance = loss_inputs((5, 3, 17, 9), torch.float32, "cpu", ("half", True))
    for p, y in [(pred.transpose(2, 3), target.transpose(2, 3)), (pred.to(memory_format=torch.channels_last), target)]:
        fused = ops.dreambooth_loss(p, y, weights, n_instance, 0.7)
        eager = reference.dreambooth_loss(p, y, weights, n_instance, 0.7)
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)


def test_dreambooth_loss_with_no_prior_rows_is_the_weighted_mean():
    pred, target, weights, _ = loss_inputs((5, 3, 17, 9), torch.float64, "cpu", (None, True))
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    expected = (per_sample * weights.double()).mean()
    torch.testing.assert_close(ops.dreambooth_loss(pred, target, weights), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(ops.dreambooth_loss(pred, target), per_sample.mean(), rtol=1e-12, atol=0)


def test_dreambooth_loss_is_deterministic_across_runs_and_thread_counts():
    pred, target, weights, n_instance = loss_inputs(LARGE, torch.float32, "cpu", ("half", True))
    op = torch.ops.dreambooth_fast.dreambooth_loss
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        loss_1, grad_1, parts_1 = op(pred, target, weights, n_instance, 0.7)
        torch.set_num_threads(2)
        loss_2, grad_2, parts_2 = op(pred, target, weights, n_instance, 0.7)
        loss_3, grad_3, parts_3 = op(pred, target, weights, n_instance, 0.7)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(loss_1, loss_2) and torch.equal(loss_2, loss_3)
    assert torch.equal(grad_1, grad_2) and torch.equal(grad_2, grad_3)
    assert torch.equal(parts_1, parts_2) and torch.equal(parts_2, parts_3)


# --- registration: opcheck, torch.compile -----------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_add_noise_passes_opcheck(prediction_type):
    x0, eps, t = noise_inputs((3, 3, 7, 5), torch.float32, "cpu")
    torch.library.opcheck(
        torch.ops.dreambooth_fast.add_noise.default, (x0.requires_grad_(), eps, t, alphas_cumprod(), prediction_type)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_CASE_IDS)
def test_dreambooth_loss_passes_opcheck(case, dtype):
    pred, target, weights, n_instance = loss_inputs((5, 6, 7, 5), dtype, "cpu", case)
    pred = pred.requires_grad_()[:, :3]
    target = target[:, :3].contiguous()
    n_instance = pred.shape[0] if n_instance is None else n_instance
    torch.library.opcheck(torch.ops.dreambooth_fast.dreambooth_loss.default, (pred, target, weights, n_instance, 0.7))


def _training_step(x0, eps, t, ac, weights, param, n_instance):
    x_t, target = ops.add_noise(x0, eps, t, ac, "v_prediction")
    pred = (x_t * param).repeat(1, 2, 1, 1)[:, :3]
    return ops.dreambooth_loss_with_parts(pred, target, weights, n_instance, 0.5)


def _check_compiled_step(backend: str) -> None:
    ac = alphas_cumprod()
    compiled = torch.compile(_training_step, fullgraph=True, backend=backend)
    for batch, n_instance in [(4, 2), (6, None)]:  # the second call recompiles with a dynamic batch
        x0, eps, t = noise_inputs((batch, 3, 7, 5), torch.float32, "cpu", seed=batch)
        weights = torch.rand(n_instance or batch)
        results = []
        for fn in (compiled, _training_step):
            param = torch.linspace(0.5, 1.5, 3).reshape(1, 3, 1, 1).requires_grad_()
            loss, parts = fn(x0, eps, t, ac, weights, param, n_instance)
            loss.backward()
            results.append((loss, parts, param.grad))
        torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_ops_compile_with_fullgraph():
    torch._dynamo.reset()
    _check_compiled_step("aot_eager")


@pytest.mark.slow
def test_ops_compile_with_fullgraph_inductor():
    torch._dynamo.reset()
    _check_compiled_step("inductor")


# --- the CPU kernels for CPUs without AVX2 ----------------------------------------------------------------------

_DEFAULT_KERNELS_CHECK = """
import torch
from dreambooth_fast import _C, ops, reference
assert _C.cpu_kernels == "DEFAULT", _C.cpu_kernels
ac = torch.linspace(0.999, 0.01, 1000)
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=2e-2)
    x0, eps = torch.randn(5, 3, 17, 9, generator=g).to(dtype), torch.randn(5, 3, 17, 9, generator=g).to(dtype)
    t = torch.randint(0, 1000, (5,), generator=g)
    exact = reference.add_noise(x0.double(), eps.double(), t, ac.double(), "v_prediction")
    for f, e in zip(ops.add_noise(x0, eps, t, ac, "v_prediction"), exact):
        torch.testing.assert_close(f.double(), e, **tol)
    w = torch.rand(3, generator=g)
    p = x0.requires_grad_()
    loss = ops.dreambooth_loss(p, eps, w, 3, 0.7)
    (grad,) = torch.autograd.grad(loss, p)
    p64 = x0.detach().double().requires_grad_()
    loss64 = reference.dreambooth_loss(p64, eps.double(), w.double(), 3, 0.7)
    (grad64,) = torch.autograd.grad(loss64, p64)
    torch.testing.assert_close(loss.double(), loss64, **tol)
    torch.testing.assert_close(grad.double(), grad64, **tol)
    _, parts = ops.dreambooth_loss_with_parts(x0, eps, w, 3, 0.7)
    _, parts64 = reference.dreambooth_loss_with_parts(x0.double(), eps.double(), w.double(), 3, 0.7)
    torch.testing.assert_close(parts.double(), parts64, **tol)
"""


@pytest.mark.skipif(ops.native_cpu_kernels() != "AVX2", reason="only one kind of CPU kernels on this machine")
def test_default_cpu_kernels_match_reference():
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    done = subprocess.run([sys.executable, "-c", _DEFAULT_KERNELS_CHECK], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


# --- bad arguments: clear errors from the C++ side --------------------------------------------------------------


def _noise_args(**change):
    x0, eps, t = noise_inputs((3, 3, 7, 5), torch.float32, "cpu")
    args = {"x0": x0, "eps": eps, "timesteps": t, "alphas_cumprod": alphas_cumprod(), "prediction_type": "epsilon"}
    return {**args, **change}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"eps": torch.randn(3, 3, 7, 6)}, r"add_noise: eps has shape \[3, 3, 7, 6\] but x0 has \[3, 3, 7, 5\]"),
        ({"timesteps": torch.tensor([0, 1000, 5])}, r"add_noise: timesteps\[1\] = 1000 is outside the alphas_cumprod"),
        ({"timesteps": torch.tensor([0, 1, -1])}, r"add_noise: timesteps\[2\] = -1 is outside"),
        ({"timesteps": torch.tensor([0, 1])}, r"add_noise: timesteps must have shape \[batch\] = \[3\]"),
        ({"timesteps": torch.tensor([0.0, 1.0, 2.0])}, r"add_noise: timesteps must be int64 or int32"),
        ({"x0": torch.zeros(3, 3, 7, 5, dtype=torch.int64)}, r"add_noise: x0 must be float32, float64, float16"),
        ({"eps": torch.randn(3, 3, 7, 5, dtype=torch.float64)}, r"add_noise: eps has dtype Double but x0 has Float"),
        ({"alphas_cumprod": torch.rand(1000).half()}, r"add_noise: alphas_cumprod must be float32 or float64"),
        ({"alphas_cumprod": torch.rand(10, 100)}, r"add_noise: alphas_cumprod must be a non-empty 1-D table"),
        ({"prediction_type": "flow"}, r"add_noise: prediction_type must be 'epsilon', 'v_prediction' or 'sample'"),
    ],
    ids=[
        "shape",
        "t-too-big",
        "t-negative",
        "t-count",
        "t-dtype",
        "x0-dtype",
        "eps-dtype",
        "table-dtype",
        "table-shape",
        "prediction-type",
    ],
)
def test_add_noise_rejects_bad_arguments(change, message):
    with pytest.raises(RuntimeError, match=message):
        ops.add_noise(**_noise_args(**change))


def test_host_timestep_check_names_the_first_timestep_outside_the_table():
    # What ops.add_noise runs on CPU timesteps bound for a CUDA x0, instead of the context-poisoning device assert.
    with pytest.raises(RuntimeError, match=r"add_noise: timesteps\[1\] = 1000 is outside the alphas_cumprod table "
                                           r"\[0, 1000\)"):
        ops._check_timesteps_on_host(torch.tensor([0, 1000, -1]), 1000)
    ops._check_timesteps_on_host(torch.tensor([0, 999]), 1000)


def _loss_args(**change):
    pred, target, _, _ = loss_inputs((4, 3, 7, 5), torch.float32, "cpu", (None, False))
    args = {"pred": pred, "target": target, "weights": torch.rand(2), "n_instance": 2, "prior_weight": 1.0}
    return {**args, **change}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target": torch.randn(4, 3, 7, 6)}, r"dreambooth_loss: target has shape \[4, 3, 7, 6\] but pred has"),
        ({"n_instance": 0, "weights": None}, r"dreambooth_loss: n_instance must be in \[1, batch = 4\], got 0"),
        ({"n_instance": 5, "weights": None}, r"dreambooth_loss: n_instance must be in \[1, batch = 4\], got 5"),
        ({"weights": torch.rand(3)}, r"dreambooth_loss: weights must have shape \[n_instance\] = \[2\], got \[3\]"),
        ({"weights": torch.ones(2, dtype=torch.int64)}, r"dreambooth_loss: weights must be a float tensor"),
        ({"pred": torch.zeros(4, 3, 7, 5, dtype=torch.int32)}, r"dreambooth_loss: pred must be float32, float64"),
        ({"target": torch.randn(4, 3, 7, 5).half()}, r"dreambooth_loss: target has dtype Half but pred has Float"),
    ],
    ids=["shape", "n-instance-0", "n-instance-too-big", "weights-shape", "weights-dtype", "pred-dtype", "target-dtype"],
)
def test_dreambooth_loss_rejects_bad_arguments(change, message):
    with pytest.raises(RuntimeError, match=message):
        ops.dreambooth_loss(**_loss_args(**change))
