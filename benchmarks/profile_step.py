"""Where one DreamBooth training step spends its time: torch.profiler over `StageTrainer.optimizer_step()` (noise,
UNet forward and backward, loss, clip, optimizer, lr), ops grouped by what they do, self time per step.

    python -m benchmarks.profile_step [--stage base|sr] [--config tiny|default|if-small|if] [--device cpu|cuda]
                                      [--batch N] [--steps N] [--eager] [--threads N] [--out DIR]

Configs: tiny (the tests' random cascade), default (the embedded toy-world model), if-small (IF-I-XL's or
IF-II-L's published UNet layout, widths and text width scaled down to fit a CPU), if (the published configs, for a
GPU). --eager profiles the diffusers-style baseline step of bench_train (per-parameter Adam, eager UNet) instead.

Groups, by the op or the nearest enclosing op that names one: the fused ops (dreambooth_fast::), the optimizer
(everything under Optimizer.step and zero_grad, and gradient clipping), conv, attention, linear, norm+activation
(GroupNorm, LayerNorm, GELU, SiLU), copies, other. Self time: an op's time without its children's, so the groups
add up to the step. Prints the group table and the top ops; appends both to DIR/profile.csv.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.bench_train import (
    IF_MODELS,
    Case,
    eager_step_fn,
    make_trainer,
    published_unet_config,
    stage_schedulers,
)
from benchmarks.common import (
    RESULTS_DIR,
    add_threads_option,
    append_rows,
    default_device,
    format_table,
    load_average,
    run_info,
    set_threads,
)
from dreambooth_fast.models import STAGE_2_DIR, load_unet
from dreambooth_fast.toy.default_model import DEFAULT_MODEL
from dreambooth_fast.toy.if_layout import if_unet_config
from dreambooth_fast.toy.tiny_cascade import build_tiny_cascade

CONFIGS = ("tiny", "default", "if-small", "if")
GROUPS = ("conv", "attention", "linear", "norm+activation", "optimizer", "fused ops", "copies", "other")
# Substrings of op names (aten ops and autograd nodes, lower case) per group, tried in this order.
PATTERNS = {
    "conv": ("conv",),
    "attention": ("attention", "bmm", "softmax"),
    "linear": ("addmm", "aten::mm", "aten::linear", "mmbackward"),
    "norm+activation": ("group_norm", "groupnorm", "layer_norm", "layernorm", "gelu", "silu"),
    "copies": ("copy", "aten::to", "clone", "contiguous", "aten::cat", "catbackward"),
}
# Gradient clipping runs outside Optimizer.step: profile_steps wraps it in a range of this name.
CLIP_RANGE = "clip_grad_norm_"
TOP_OPS = 15


def scaled_if_unet_config(stage: str) -> dict:
    """IF-I-XL's (stage I) or IF-II-L's (stage II) UNet layout, scaled to fit a CPU: the same levels, blocks per
    level, block types and GELU with scale-shift GroupNorm, at 1/22 (stage I) and 1/5-1/10 (stage II) of the
    widths, 32-wide attention heads, a 128-wide text embedding, 32 px (stage I) and 64 px (stage II)."""
    if stage == "base":
        return if_unet_config(32, [32, 64, 96, 128], [False, True, True, True], text_dim=128,
                              attention_head_dim=32, layers_per_block=3, addition_embed_type_num_heads=4)
    return if_unet_config(64, [32, 32, 64, 96, 128], [False, False, False, True, True], text_dim=128,
                          attention_head_dim=32, super_resolution=True, layers_per_block=[2, 2, 3, 5, 5],
                          addition_embed_type_num_heads=4, time_embedding_dim=128, resnet_skip_time_act=True,
                          resnet_out_scale_factor=1 / 0.7071, mid_block_scale_factor=1 / 0.7071)


def stage_model(config: str, stage: str, device: str, tmp: Path, tiny_dir: Path | None = None):
    """(UNet, training scheduler, SR noising scheduler or None) of a config's stage; `tiny_dir`: a tiny cascade
    already built (else one is built under `tmp`)."""
    if config in ("tiny", "default"):
        model_dir = DEFAULT_MODEL if config == "default" else tiny_dir or build_tiny_cascade(tmp / "tiny")
        unet = load_unet(model_dir if stage == "base" else model_dir / STAGE_2_DIR, device)
        return unet, *stage_schedulers(stage, model_dir)
    from diffusers import UNet2DConditionModel

    unet_config = scaled_if_unet_config(stage) if config == "if-small" else published_unet_config(stage)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config)
    return unet, *stage_schedulers(stage, None)


def group_of(event) -> str:
    """The group of a profiler event: the fused ops or the optimizer when it runs inside them, else the first group
    whose pattern matches the op's name or, going outwards, an enclosing op's."""
    chain = []
    while event is not None:
        chain.append(event.name.lower())
        event = event.cpu_parent
    if any(name.startswith("dreambooth_fast::") for name in chain):
        return "fused ops"
    if any(name.startswith("optimizer.") or name == CLIP_RANGE for name in chain):
        return "optimizer"
    for name in chain:
        for group, patterns in PATTERNS.items():
            if any(p in name for p in patterns):
                return group
    return "other"


def profile_steps(step, device: str, steps: int) -> tuple[dict[str, float], dict[tuple[str, str], float], float]:
    """Self seconds per step by group and by (group, op), and the step's wall seconds, over `steps` profiled steps."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    clip = torch.nn.utils.clip_grad_norm_

    def named_clip(*args, **kwargs):
        with record_function(CLIP_RANGE):
            return clip(*args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = named_clip  # both steps call it through torch.nn.utils
    try:
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    attr = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    groups = dict.fromkeys(GROUPS, 0.0)
    ops: dict[tuple[str, str], float] = {}
    for event in prof.events():
        seconds = getattr(event, attr) / 1e6 / steps
        if seconds <= 0:
            continue
        group = group_of(event)
        groups[group] += seconds
        ops[(group, event.name)] = ops.get((group, event.name), 0.0) + seconds
    return groups, ops, sum(groups.values())


def run(config: str, stage: str, device: str, *, batch: int = 1, steps: int = 3, warmup: int = 2,
        eager: bool = False, out: Path | None = None, command: str = "", tiny_dir: Path | None = None) -> list[dict]:
    """Profile `steps` steps of the config's stage after `warmup`; print the tables, append the rows to `out`
    (default benchmarks/results/profile.csv) and return them."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        unet, scheduler, noising = stage_model(config, stage, device, Path(tmp), tiny_dir)
        size = unet.config.sample_size
        model = IF_MODELS[stage] if config == "if" else config
        case = Case(stage, model, size, batch, "bf16" if device.startswith("cuda") else "fp32",
                    checkpointing=config == "if")
        trainer = make_trainer(case, unet, scheduler, noising, device, Path(tmp), torch.Generator().manual_seed(0))
        step = eager_step_fn(trainer, scheduler, noising, batch) if eager \
            else trainer.optimizer_step
        for _ in range(warmup):
            step()
        groups, ops, total = profile_steps(step, device, steps)
    impl = "diffusers_eager" if eager else "dreambooth_fast"
    common = {**run_info(device), "command": command, "suite": "profile", "config": config, "model": model,
              "stage": stage, "impl": impl, "dtype": case.dtype, "shape": case.shape,
              "params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2), "steps": steps,
              "step_ms": round(total * 1e3, 2), **load_average()}
    rows = [{**common, "what": "group", "group": g, "op": "", "self_ms": round(s * 1e3, 3),
             "share_pct": round(100 * s / total, 2)} for g, s in groups.items()]
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:TOP_OPS]
    rows += [{**common, "what": "op", "group": g, "op": name, "self_ms": round(s * 1e3, 3),
              "share_pct": round(100 * s / total, 2)} for (g, name), s in top]
    out = Path(out) if out is not None else RESULTS_DIR / "profile.csv"
    append_rows(out, rows)
    print(f"{common['device_name']} ({device}, {torch.get_num_threads()} threads), {config} {stage} {case.shape} "
          f"{case.dtype}, {impl}: {common['step_ms']:.1f} ms self time per step (profiled, {steps} steps)")
    print(table(rows))
    print(f"appended {len(rows)} rows to {out}")
    return rows


def table(rows: list[dict]) -> str:
    groups = [[r["group"], f"{r['self_ms']:.2f}", f"{r['share_pct']:.1f}%"] for r in rows if r["what"] == "group"]
    ops = [[r["op"], r["group"], f"{r['self_ms']:.2f}", f"{r['share_pct']:.1f}%"] for r in rows if r["what"] == "op"]
    return (format_table(["group", "self ms/step", "share"], groups) + "\n\n"
            + format_table(["op", "group", "self ms/step", "share"], ops))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=["base", "sr"], default="base")
    parser.add_argument("--config", choices=CONFIGS, default="default")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device())
    parser.add_argument("--batch", type=int, default=1, help="subject rows per step (as many prior rows follow)")
    parser.add_argument("--steps", type=int, default=3, help="steps profiled (after 2 warm-up steps)")
    parser.add_argument("--eager", action="store_true", help="profile the diffusers-style eager step instead")
    add_threads_option(parser)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to this torch")
    for name in ("batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    set_threads(parser, args.threads)
    run(args.config, args.stage, args.device, batch=args.batch, steps=args.steps, eager=args.eager,
        out=args.out / "profile.csv", command=shlex.join(["python", "-m", "benchmarks.profile_step", *argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
