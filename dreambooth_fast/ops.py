"""The fused training ops: `add_noise` (noise the batch, make the target), `dreambooth_loss` (subject rows plus
prior rows in one pass, gradient written in the same pass) and `group_norm_act` (GroupNorm, scale-shift and
activation in one pass; its backward recomputes what it needs from the input and the per-group statistics).

They run the native kernels of `dreambooth_fast._C` (csrc/) where those are built for the tensor's device, else
the same math in plain PyTorch (reference.py); `native_status()` says which devices have native kernels. The
native ops are registered with torch.library (fake tensors, autograd), so they work under autograd and
torch.compile(fullgraph=True).
"""

from __future__ import annotations

import warnings

import torch

from . import reference

try:
    from . import _C
except ImportError as err:  # not built, or built against another torch
    _C = None
    warnings.warn(
        f"dreambooth_fast: the native extension did not load ({err}); using the plain PyTorch reference ops. "
        "Rebuild it with `pip install --no-build-isolation -e .`",
        RuntimeWarning,
        stacklevel=2,
    )

_OPS = (
    "dreambooth_fast::add_noise",
    "dreambooth_fast::dreambooth_loss",
    "dreambooth_fast::group_norm_act",
    "dreambooth_fast::group_norm_act_backward",
)


def _has_kernels(dispatch_key: str) -> bool:
    return _C is not None and all(torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key) for op in _OPS)


# Device type -> native kernels built. Read once here: a lookup at call time would break torch.compile graphs.
_NATIVE = {"cpu": _has_kernels("CPU"), "cuda": _has_kernels("CUDA")}


def native_status() -> dict[str, bool]:
    """Which devices run the native kernels: {"cpu": bool, "cuda": bool}."""
    return dict(_NATIVE)


def native_cpu_kernels() -> str | None:
    """The instruction set of the native CPU kernels on this machine ("AVX2" or "DEFAULT"), None when not built."""
    return _C.cpu_kernels if _C is not None else None


def add_noise(
    x0: torch.Tensor,
    eps: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) with x_t = sqrt(ac[t]) x0 + sqrt(1 - ac[t]) eps per sample (ac = alphas_cumprod) and the
    training target of prediction_type: eps ("epsilon"), v = sqrt(ac[t]) eps - sqrt(1 - ac[t]) x0
    ("v_prediction") or x0 ("sample"). Math in float32 (float64 for float64), outputs in x0's dtype; x_t and v are
    contiguous. timesteps (int64/int32) and the table (float32/float64) are moved to x0's device.

    A timestep outside the table is an error. On the CPU it is raised before the pass. On CUDA it is
    checked here when timesteps are a CPU tensor (free: no device sync); timesteps already on the GPU are checked
    by a device-side assert, which leaves the process's CUDA context unusable (every later CUDA call fails, and
    the process must restart), so pass CPU timesteps when they may be out of range."""
    if x0.device.type == "cuda" and timesteps.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_timesteps_on_host(timesteps, alphas_cumprod.shape[0])  # the reference's indexing asserts too
    if not _NATIVE.get(x0.device.type, False):
        return reference.add_noise(x0, eps, timesteps, alphas_cumprod, prediction_type)
    x_t, v = torch.ops.dreambooth_fast.add_noise(
        x0, eps, timesteps.to(x0.device), alphas_cumprod.to(x0.device), prediction_type
    )
    if prediction_type == "v_prediction":
        return x_t, v
    return x_t, x0 if prediction_type == "sample" else eps


def dreambooth_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    n_instance: int | None = None,
    prior_weight: float = 1.0,
) -> torch.Tensor:
    """Scalar loss: the mean over subject rows [0, n_instance) of weights[i] * mean_j (pred - target)^2 (weights
    None = 1), plus prior_weight times the mean squared error over the remaining prior rows; n_instance None means
    every row is a subject row. Float32 accumulation, result in pred's dtype. pred may be a strided view (the
    epsilon half of a 6-channel output). weights are constants: no gradient flows to them."""
    return dreambooth_loss_with_parts(pred, target, weights, n_instance, prior_weight)[0]


def dreambooth_loss_with_parts(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    n_instance: int | None = None,
    prior_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, parts): the loss of `dreambooth_loss` and its two terms [subject, prior_weight * prior mse], from the
    same pass (the prior term is 0 without prior rows). parts has no gradient and is in pred's dtype."""
    if not _NATIVE.get(pred.device.type, False):
        return reference.dreambooth_loss_with_parts(pred, target, weights, n_instance, prior_weight)
    n_instance = pred.shape[0] if n_instance is None else n_instance
    weights = None if weights is None else weights.detach().to(pred.device)
    loss, _, parts = torch.ops.dreambooth_fast.dreambooth_loss(pred, target, weights, n_instance, float(prior_weight))
    return loss, parts


def group_norm_act(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    act: str = "gelu",
) -> torch.Tensor:
    """act(GroupNorm(x; groups, weight, bias, eps) * (1 + scale) + shift) for x [N, C, *], in one pass: diffusers'
    ResnetBlock2D norm -> scale-shift -> nonlinearity chain. scale and shift are optional, per (sample, channel)
    (any shape of N * C values, e.g. [N, C, 1, 1] time embedding chunks); act "gelu" (erf form), "silu" or
    "identity". Math in float32 (float64 for float64), one rounding to x's dtype; gradients for x, weight, bias,
    scale and shift. The kernels read channels-first memory: a channels_last x is copied to it first."""
    if act not in reference.ACTIVATIONS:
        raise ValueError(f"act must be one of {', '.join(reference.ACTIVATIONS)}, got {act!r}")
    if not _NATIVE.get(x.device.type, False):
        return reference.group_norm_act(x, groups, weight, bias, eps, scale=scale, shift=shift, act=act)
    n, c = x.shape[:2]
    scale = None if scale is None else scale.reshape(n, c)
    shift = None if shift is None else shift.reshape(n, c)
    return torch.ops.dreambooth_fast.group_norm_act(x, weight, bias, scale, shift, groups, float(eps), act)[0]


def _check_timesteps_on_host(timesteps: torch.Tensor, table_size: int) -> None:
    # The message of the CPU kernel's check (csrc/cpu/add_noise.cpp), before the device assert can fire.
    outside = ((timesteps < 0) | (timesteps >= table_size)).nonzero().flatten()
    if outside.numel() > 0:
        i = int(outside[0])
        raise RuntimeError(f"add_noise: timesteps[{i}] = {int(timesteps[i])} is outside the alphas_cumprod table "
                           f"[0, {table_size})")


def _add_noise_coefficients(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, like: torch.Tensor):
    """sqrt(ac[t]) and sqrt(1 - ac[t]) shaped to broadcast over `like`, in its math dtype."""
    math_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    ac = alphas_cumprod.to(math_dtype)[timesteps].reshape(-1, *([1] * (like.dim() - 1)))
    return ac.sqrt(), (1 - ac).sqrt()


def _add_noise_setup_context(ctx, inputs, output) -> None:
    _, _, timesteps, alphas_cumprod, prediction_type = inputs
    ctx.save_for_backward(timesteps, alphas_cumprod)
    ctx.velocity = prediction_type == "v_prediction"


def _add_noise_backward(ctx, grad_xt, grad_v):
    # x_t = a x0 + s eps and v = a eps - s x0 are linear in x0 and eps.
    timesteps, alphas_cumprod = ctx.saved_tensors
    a, s = _add_noise_coefficients(timesteps, alphas_cumprod, grad_xt)
    grad_x0, grad_eps = a * grad_xt, s * grad_xt
    if ctx.velocity:
        grad_x0, grad_eps = grad_x0 - s * grad_v, grad_eps + a * grad_v
    return grad_x0.to(grad_xt.dtype), grad_eps.to(grad_xt.dtype), None, None, None


def _loss_setup_context(ctx, inputs, output) -> None:
    _, grad_pred, parts = output
    ctx.save_for_backward(grad_pred)
    ctx.mark_non_differentiable(grad_pred, parts)
    ctx.pred_dtype = inputs[0].dtype


def _upstream_is_one(t: torch.Tensor) -> bool:
    """Whether the upstream gradient is exactly 1 (a loss backpropagated directly), where its value can be read:
    never while compiling (there is no value) or capturing a CUDA graph (a read is not allowed). On CUDA the read
    waits for the device; in a training loop that has just read the loss (train.py's `loss.item()`) that wait is
    all but free, and it saves a pass over the gradient."""
    if type(t) is not torch.Tensor or torch.compiler.is_compiling():
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return t.item() == 1


def _loss_backward(ctx, grad_loss, _grad_buffer, _parts):
    (grad_buffer,) = ctx.saved_tensors
    if grad_buffer.dtype == ctx.pred_dtype and _upstream_is_one(grad_loss):
        grad = grad_buffer  # the gradient written by the forward pass is the answer
    else:
        # One pass: the buffer (float32 for half pred) times the upstream gradient, rounded once to pred's dtype.
        # Under fp16 loss scaling the product is normal where the buffer's values alone would be fp16 subnormals.
        grad = torch.mul(grad_buffer, grad_loss, out=torch.empty_like(grad_buffer, dtype=ctx.pred_dtype))
    return grad, -grad if ctx.needs_input_grad[1] else None, None, None, None


def _group_norm_act_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, scale, shift, groups, _, act = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.groups, ctx.act = groups, act


def _group_norm_act_backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias, grad_scale, grad_shift = torch.ops.dreambooth_fast.group_norm_act_backward(
        grad_y, x, weight, bias, scale, shift, mean, rstd, ctx.groups, ctx.act
    )
    return (
        grad_x,
        grad_weight,
        grad_bias,
        grad_scale if scale is not None else None,
        grad_shift if shift is not None else None,
        None,
        None,
        None,
    )


if _C is not None:

    @torch.library.register_fake("dreambooth_fast::add_noise")
    def _add_noise_fake(x0, eps, timesteps, alphas_cumprod, prediction_type):
        return x0.new_empty(x0.shape), x0.new_empty(x0.shape if prediction_type == "v_prediction" else (0,))

    @torch.library.register_fake("dreambooth_fast::dreambooth_loss")
    def _dreambooth_loss_fake(pred, target, weights, n_instance, prior_weight):
        # The gradient buffer is in pred's opmath dtype (float32 for float16 and bfloat16), like the kernels'.
        grad_dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
        return pred.new_empty(()), pred.new_empty(pred.shape, dtype=grad_dtype), pred.new_empty((2,))

    @torch.library.register_fake("dreambooth_fast::group_norm_act")
    def _group_norm_act_fake(x, weight, bias, scale, shift, groups, eps, act):
        stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        stats = (x.shape[0], groups)
        return x.new_empty(x.shape), x.new_empty(stats, dtype=stats_dtype), x.new_empty(stats, dtype=stats_dtype)

    @torch.library.register_fake("dreambooth_fast::group_norm_act_backward")
    def _group_norm_act_backward_fake(grad_y, x, weight, bias, scale, shift, mean, rstd, groups, act):
        return (
            x.new_empty(x.shape),
            weight.new_empty(weight.shape),
            bias.new_empty(bias.shape),
            scale.new_empty(scale.shape) if scale is not None else x.new_empty((0,)),
            shift.new_empty(shift.shape) if shift is not None else x.new_empty((0,)),
        )

    torch.library.register_autograd(
        "dreambooth_fast::group_norm_act", _group_norm_act_backward, setup_context=_group_norm_act_setup_context
    )
    torch.library.register_autograd(
        "dreambooth_fast::add_noise", _add_noise_backward, setup_context=_add_noise_setup_context
    )
    torch.library.register_autograd(
        "dreambooth_fast::dreambooth_loss", _loss_backward, setup_context=_loss_setup_context
    )
