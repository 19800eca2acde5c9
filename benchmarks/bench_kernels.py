"""Kernel benchmark: the fused ops (dreambooth_fast.ops) against eager PyTorch (dreambooth_fast.reference: the
diffusers expressions, autograd for the backward), measured alternating in one run.

Sizes are those of a training step: a 64 px base stage (batch 2-16) and a 256 px SR stage (batch 2-8), 3 image
channels, in fp32 and bf16. add_noise is timed forward only (no gradient flows into the data and the noise in
training). dreambooth_loss is timed forward, backward and both, on the epsilon half of a 6-channel UNet output
(a strided view, as in training; it is made a leaf so that the slice's own backward, which is the same for
both and belongs to the training-step benchmark, is not timed here), half the rows prior rows.

group_norm_act (GroupNorm + scale-shift + GELU, diffusers' ResnetBlock2D chain) is timed forward, backward and both
against its eager chain (F.group_norm, `* (1 + scale) + shift`, F.gelu, autograd), at IF stage I block shapes
scaled to this CPU (IF-I-XL: 320..1280 channels in 32 groups at 64 px; here batch 2 at 320 x 64 px and
640 x 32 px) and at the default model's (32 and 64 channels in 8 groups at 32 and 16 px, batch 1 + 1 prior);
scale and shift are the two chunks of a [N, 2C, 1, 1] time embedding, as in the block.

Achieved GB/s counts the floor of memory traffic of the whole op (add_noise: read x0 and eps, write x_t;
dreambooth_loss forward+backward: read pred and target, write the gradient; group_norm_act forward+backward:
read x, write y, read x and dy, write dx) over the median time, beside
the copy bandwidth (`dst.copy_(src)` of a tensor larger than the caches) measured in the same run; working sets
that fit in a CPU's cache can exceed it (over 100%).

    python -m benchmarks.bench_kernels [--device cpu|cuda] [--quick] [--repeats N] [--threads N] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import (
    RESULTS_DIR,
    Stats,
    Timed,
    add_threads_option,
    append_rows,
    copy_bandwidth,
    default_device,
    format_table,
    load_average,
    measure,
    run_info,
    set_threads,
)
from dreambooth_fast import ops, reference

CHANNELS = 3
UNET_OUT_CHANNELS = 6  # epsilon + learned variance
STAGES = {"base64": (64, (2, 4, 8, 16)), "sr256": (256, (2, 4, 8))}
QUICK_STAGES = {"base64": (64, (2, 16)), "sr256": (256, (2, 8))}
SMOKE_STAGES = {"smoke": (8, (2,))}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NUM_TRAIN_TIMESTEPS = 1000
COPY_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30, "smoke": 1 << 20}
# group_norm_act cases: name -> (batch, channels, size, groups).
NORM_SHAPES = {"if1-320": (2, 320, 64, 32), "if1-640": (2, 640, 32, 32), "default-32": (2, 32, 32, 8),
               "default-64": (2, 64, 16, 8)}
SMOKE_NORM_SHAPES = {"smoke": (2, 8, 4, 2)}


@dataclass(frozen=True)
class Case:
    stage: str
    size: int
    batch: int
    dtype: str

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, CHANNELS, self.size, self.size)

    @property
    def floor_bytes(self) -> int:
        """Read two tensors of the shape once, write one once (the floor of both ops)."""
        numel = self.batch * CHANNELS * self.size * self.size
        return 3 * numel * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class NormCase:
    stage: str
    batch: int
    channels: int
    size: int
    groups: int
    dtype: str

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.size, self.size)

    @property
    def floor_bytes(self) -> int:
        """Forward and backward: read x, write y; read x and dy, write dx."""
        return 5 * self.batch * self.channels * self.size * self.size * DTYPES[self.dtype].itemsize


def cases(stages: dict[str, tuple[int, tuple[int, ...]]], dtypes: list[str]) -> list[Case]:
    return [Case(stage, size, batch, dtype) for stage, (size, batches) in stages.items() for batch in batches
            for dtype in dtypes]


def add_noise_candidates(case: Case, device: str) -> dict[str, Timed]:
    dtype = DTYPES[case.dtype]
    x0 = torch.randn(case.shape, device=device).to(dtype)
    eps = torch.randn(case.shape, device=device).to(dtype)
    timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (case.batch,), device=device)
    betas = torch.linspace(1e-4, 0.02, NUM_TRAIN_TIMESTEPS, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0).to(device=device, dtype=torch.float32)
    return {
        impl: Timed(lambda fn=module.add_noise: fn(x0, eps, timesteps, alphas_cumprod, "epsilon"))
        for impl, module in (("fused", ops), ("eager", reference))
    }


def loss_candidates(case: Case, device: str, direction: str) -> dict[str, Timed]:
    dtype = DTYPES[case.dtype]
    unet_out = torch.randn((case.batch, UNET_OUT_CHANNELS, case.size, case.size), device=device).to(dtype)
    pred = unet_out[:, :CHANNELS].detach().requires_grad_()  # strided rows, like the epsilon half in training
    target = torch.randn(case.shape, device=device).to(dtype)
    n_instance = case.batch // 2
    state = {}

    def forward(fn):
        return fn(pred, target, None, n_instance, 1.0)

    def clear_grad():
        pred.grad = None

    def candidate(fn) -> Timed:
        if direction == "fwd":
            return Timed(lambda: forward(fn))
        if direction == "bwd":
            def setup():
                clear_grad()
                state["loss"] = forward(fn)

            return Timed(lambda: state["loss"].backward(), setup)
        return Timed(lambda: forward(fn).backward(), clear_grad)

    return {"fused": candidate(ops.dreambooth_loss), "eager": candidate(reference.dreambooth_loss)}


def norm_candidates(case: NormCase, device: str, direction: str) -> dict[str, Timed]:
    dtype = DTYPES[case.dtype]
    x = torch.randn(case.shape, device=device).to(dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(case.channels, device=device)).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(case.channels, device=device)).to(dtype).requires_grad_()
    temb = (0.5 * torch.randn((case.batch, 2 * case.channels, 1, 1), device=device)).to(dtype).requires_grad_()
    upstream = torch.randn(case.shape, device=device).to(dtype)
    state = {}

    def forward(fn):
        scale, shift = temb.chunk(2, dim=1)
        return fn(x, case.groups, weight, bias, 1e-5, scale=scale, shift=shift, act="gelu")

    def clear_grads():
        for t in (x, weight, bias, temb):
            t.grad = None

    def candidate(fn) -> Timed:
        if direction == "fwd":
            return Timed(lambda: forward(fn))
        if direction == "bwd":
            def setup():
                clear_grads()
                state["y"] = forward(fn)

            return Timed(lambda: state["y"].backward(upstream), setup)
        return Timed(lambda: forward(fn).backward(upstream), clear_grads)

    return {"fused": candidate(ops.group_norm_act), "eager": candidate(reference.group_norm_act)}


# The work a training step does of each op: add_noise forward only, the others forward and backward.
WHOLE_OPS = {("add_noise", "fwd"), ("dreambooth_loss", "fwd+bwd"), ("group_norm_act", "fwd+bwd")}


def bench_case(case: Case | NormCase, device: str, *, rounds: int, warmup: int, min_round_s: float) -> list[dict]:
    """One row per (op, direction, implementation) of the case, without the run-wide columns."""
    torch.manual_seed(0)
    if isinstance(case, NormCase):
        jobs = [("group_norm_act", d, norm_candidates(case, device, d)) for d in ("fwd", "bwd", "fwd+bwd")]
    else:
        jobs = [("add_noise", "fwd", add_noise_candidates(case, device))]
        jobs += [("dreambooth_loss", d, loss_candidates(case, device, d)) for d in ("fwd", "bwd", "fwd+bwd")]
    rows = []
    for op, direction, candidates in jobs:
        stats = measure(candidates, device, rounds=rounds, warmup=warmup, min_round_s=min_round_s)
        whole_op = (op, direction) in WHOLE_OPS
        for impl, s in stats.items():
            rows.append(result_row(case, op, direction, impl, s, stats["eager"], whole_op))
    return rows


def result_row(case: Case | NormCase, op: str, direction: str, impl: str, s: Stats, eager: Stats,
               whole_op: bool) -> dict:
    return {
        "suite": "kernels",
        "stage": case.stage,
        "op": op,
        "direction": direction,
        "impl": impl,
        "dtype": case.dtype,
        "shape": "x".join(map(str, case.shape)),
        "median_us": round(s.median * 1e6, 2),
        "min_us": round(s.minimum * 1e6, 2),
        "max_us": round(s.maximum * 1e6, 2),
        "q1_us": round(s.q1 * 1e6, 2),
        "q3_us": round(s.q3 * 1e6, 2),
        "samples": s.samples,
        "rounds": s.rounds,
        "speedup_vs_eager": round(eager.median / s.median, 3),
        # GB/s of the op's floor traffic; only where the timed work is the whole op.
        "floor_bytes": case.floor_bytes if whole_op else "",
        "gbps": round(case.floor_bytes / s.median / 1e9, 2) if whole_op else "",
    }


def run(
    device: str, *, quick: bool = False, smoke: bool = False, repeats: int | None = None, out: Path | None = None
) -> list[dict]:
    """Runs the kernel benchmark, appends its rows to `out` (default benchmarks/results/kernels.csv), prints a
    table, and returns the rows. `repeats` is the number of alternating rounds, each about 20 ms of calls of
    each implementation (one call each in smoke mode)."""
    stages = SMOKE_STAGES if smoke else QUICK_STAGES if quick else STAGES
    rounds = repeats or (1 if smoke else 5 if quick else 15)
    warmup = 1 if smoke else 3
    min_round_s = 0.0 if smoke else 0.02
    out = Path(out) if out is not None else RESULTS_DIR / "kernels.csv"
    device_type = torch.device(device).type
    native = ops.native_status().get(device_type, False)
    if not native:
        print(f"warning: no native ops built for {device_type}: 'fused' runs the reference", file=sys.stderr)

    copy_gbps = copy_bandwidth(device, COPY_BYTES["smoke" if smoke else device_type]) / 1e9
    env = run_info(device)
    norm_shapes = SMOKE_NORM_SHAPES if smoke else NORM_SHAPES
    norm_cases = [NormCase(stage, *shape, dtype) for stage, shape in norm_shapes.items() for dtype in DTYPES]
    rows = []
    for case in cases(stages, list(DTYPES)) + norm_cases:
        load = load_average()  # per case: a shared machine's load changes during the run
        for row in bench_case(case, device, rounds=rounds, warmup=warmup, min_round_s=min_round_s):
            pct = round(100 * row["gbps"] / copy_gbps, 1) if row["gbps"] != "" else ""
            rows.append({**env, **row, **load, "native": native, "copy_gbps": round(copy_gbps, 2), "pct_copy": pct})
    append_rows(out, rows)
    print(f"{env['device_name']} ({device}, {env['threads']} threads), torch {env['torch']}, commit {env['commit']}")
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s; native ops for {device_type}: {native}")
    print(table(rows))
    print(f"appended {len(rows)} rows to {out}")
    return rows


def table(rows: list[dict]) -> str:
    """One line per (case, op, direction): fused and eager median (min-max) in us, speedup, fused GB/s."""
    eager = {_key(r): r for r in rows if r["impl"] == "eager"}
    lines = []
    for r in rows:
        if r["impl"] != "fused":
            continue
        e = eager[_key(r)]
        lines.append([
            r["stage"], r["shape"], r["dtype"], r["op"], r["direction"],
            f"{r['median_us']:.1f} ({r['min_us']:.1f}-{r['max_us']:.1f})",
            f"{e['median_us']:.1f} ({e['min_us']:.1f}-{e['max_us']:.1f})",
            f"{r['speedup_vs_eager']:.2f}x",
            "" if r["gbps"] == "" else f"{r['gbps']:.1f}",
            "" if r["pct_copy"] == "" else f"{r['pct_copy']:.0f}%",
        ])
    header = ["stage", "shape", "dtype", "op", "dir", "fused us (min-max)", "eager us (min-max)", "speedup",
              "fused GB/s", "% copy"]
    return format_table(header, lines)


def _key(row: dict) -> tuple:
    return row["stage"], row["shape"], row["dtype"], row["op"], row["direction"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device())
    parser.add_argument("--quick", action="store_true", help="a few sizes, 5 rounds")
    parser.add_argument("--smoke", action="store_true", help="the tiniest size, one call each: proves it runs (CI)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating timed rounds per measurement")
    add_threads_option(parser)
    parser.add_argument("--out", type=Path, default=None, help="CSV to append to (default: results/kernels.csv)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to this torch")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    set_threads(parser, args.threads)
    run(args.device, quick=args.quick, smoke=args.smoke, repeats=args.repeats, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
