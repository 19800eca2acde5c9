"""Generation benchmark: per UNet backend (eager torch, torch.compile, ONNX Runtime, TensorRT where present) the
UNet latency of one denoising step of each stage and the end-to-end cascade time for one prompt, as ratios to
eager, all backends measured alternating in one run after warm-up.

A step is one call of the stage's UNet runner at the sampler's batch (one prompt under classifier-free guidance:
2 rows). End to end is `sample.generate_cascade` for one prompt: T5 encoding, the base stage and the SR stage at
`dbfast generate`'s default steps (50 + 25) and guidance; the same seed for every backend, and the largest pixel
difference of its image from eager's is recorded. What each backend costs once (compilation, ONNX export with
its parity check, engine build) is recorded as prepare_s and excluded from the timings. Backends run as
`dbfast generate --backend` runs them (backends.unet_runner), at their default precision: torch and compile in
the model's float32, onnx from its fp32 export, trt from its fp16 engine. Beside onnx, "onnx-ort-defaults" runs the
same export with ONNX Runtime's default session options (a thread per physical core, spinning workers) instead of
the runner's (torch's thread count, sleeping workers: runners.onnx_session_options), to show what those options
give. A backend that cannot run here (no TensorRT, no GPU) gets a row saying why. On the tiny cascade.

    python -m benchmarks --suite generate [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    RESULTS_DIR,
    Timed,
    append_rows,
    format_table,
    load_average,
    measure_paired,
    ratio_spread,
    run_info,
    summarize,
)
from dreambooth_fast.backends import BACKENDS, unet_runner
from dreambooth_fast.errors import UserError
from dreambooth_fast.export import export_cascade
from dreambooth_fast.export.onnx_export import onnx_file_name, unet_spec
from dreambooth_fast.export.runners import OnnxRunner
from dreambooth_fast.models import load_cascade
from dreambooth_fast.sample import generate_cascade
from dreambooth_fast.toy.tiny_cascade import build_tiny_cascade

EAGER = "torch"
PROMPT = "a red star on a blue background"
# dbfast generate's defaults (generate.generate_images).
STEPS, SR_STEPS, GUIDANCE, SR_GUIDANCE, NOISE_LEVEL = 50, 25, 7.0, 4.0, 250
GUIDED_BATCH = 2  # one prompt, conditional + unconditional rows
ORT_DEFAULTS = "onnx-ort-defaults"  # the onnx export under ONNX Runtime's default session options
PRECISION = {"torch": "fp32", "compile": "fp32", "onnx": "fp32", ORT_DEFAULTS: "fp32", "trt": "fp16"}


class Unavailable(Exception):
    """A backend that cannot run on this machine; the message says why."""


def prepare(backend: str, cascade, export_dir: Path, device: str) -> dict:
    """{"base": runner, "sr": runner} of `backend`, exporting first where it needs an export."""
    if backend in ("onnx", ORT_DEFAULTS, "trt"):
        try:
            if backend == "trt" and torch.device(device).type != "cuda":
                raise Unavailable("TensorRT needs a CUDA device")
            export_cascade(cascade.base_dir, out_dir=export_dir, onnx=backend != "trt", trt=backend == "trt",
                           log=lambda line: None)
        except UserError as err:
            raise Unavailable(str(err)) from None
    runners = {}
    for stage, unet, stage_dir in (("base", cascade.base_unet, cascade.base_dir),
                                   ("sr", cascade.sr_unet, cascade.sr_dir)):
        if backend == ORT_DEFAULTS:
            import onnxruntime

            runners[stage] = OnnxRunner(export_dir / stage / onnx_file_name("fp32"), device,
                                        options=onnxruntime.SessionOptions())
        else:
            runners[stage] = unet_runner(backend, unet, stage_dir, export_dir, stage, torch.device(device))
    return runners


def step_inputs(unet, device: str, generator: torch.Generator) -> tuple:
    """Arguments of one runner call as the sampler makes them: (sample, timestep, embeddings, class labels)."""
    shapes = unet_spec(unet).shapes(GUIDED_BATCH)
    sample = torch.randn(shapes["sample"], generator=generator).to(device)
    embeds = torch.randn(shapes["encoder_hidden_states"], generator=generator).to(device)
    timestep = torch.full((GUIDED_BATCH,), 500, dtype=torch.long, device=device)
    labels = torch.full((GUIDED_BATCH,), NOISE_LEVEL, dtype=torch.long, device=device) if "class_labels" in shapes \
        else None
    return sample, timestep, embeds, labels


def run(device: str, *, quick: bool = False, smoke: bool = False, out: Path | None = None,
        model_dir: Path | None = None, command: str = "",
        backends: tuple[str, ...] = (*BACKENDS, ORT_DEFAULTS)) -> list[dict]:
    """Runs the generation benchmark for `backends`, appends its rows to `out` (default
    benchmarks/results/generate.csv), prints a table and returns the rows."""
    out = Path(out) if out is not None else RESULTS_DIR / "generate.csv"
    step_rounds, e2e_rounds, warmup = (1, 1, 1) if smoke else (20, 3, 1) if quick else (50, 5, 2)
    steps, sr_steps = (2, 2) if smoke else (STEPS, SR_STEPS)
    info = run_info(device)
    rows, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        model_dir = model_dir or build_tiny_cascade(Path(tmp) / "tiny")
        cascade = load_cascade(model_dir, device=device)
        sizes = {"base": cascade.base_size, "sr": cascade.sr_size}
        runners, prepare_s = {}, {}
        generator = torch.Generator().manual_seed(0)
        inputs = {stage: step_inputs(getattr(cascade, f"{stage}_unet"), device, generator) for stage in sizes}
        for backend in backends:
            start = time.perf_counter()
            try:
                runners[backend] = prepare(backend, cascade, Path(tmp) / "export", device)
            except Unavailable as err:
                skipped.append({"suite": "generate", "backend": backend, "what": "skipped", "note": str(err)})
                continue
            for stage, runner in runners[backend].items():
                runner(*inputs[stage])  # the first call compiles (torch.compile) or sets up the session
            prepare_s[backend] = round(time.perf_counter() - start, 2)
        ready = list(runners)

        step_samples = {}
        for stage in sizes:
            candidates = {b: Timed(lambda b=b, stage=stage: runners[b][stage](*inputs[stage])) for b in ready}
            step_samples[stage] = measure_paired(candidates, device, rounds=step_rounds, warmup=warmup)

        images = {}

        def cascade_call(backend: str) -> None:
            images[backend] = generate_cascade(
                cascade, [PROMPT], base_unet_fn=runners[backend]["base"], sr_unet_fn=runners[backend]["sr"],
                base_steps=steps, base_guidance=GUIDANCE, sr_steps=sr_steps, sr_guidance=SR_GUIDANCE,
                noise_level=NOISE_LEVEL, generator=torch.Generator().manual_seed(0), progress=False)["sr"]

        e2e_samples = measure_paired({b: Timed(lambda b=b: cascade_call(b)) for b in ready}, device,
                                     rounds=e2e_rounds, warmup=warmup)

    load = load_average()
    for what, stage, samples, rounds in [("unet_step", s, step_samples[s], step_rounds) for s in sizes] + [
            ("cascade", "base+sr", e2e_samples, e2e_rounds)]:
        for backend in ready:
            st = summarize(samples[backend], rounds)
            ratio = ratio_spread(samples[EAGER], samples[backend]) if EAGER in samples else ("", "", "")
            shape = (f"{GUIDED_BATCH}x{inputs[stage][0].shape[1]}x{sizes[stage]}x{sizes[stage]}"
                     if what == "unet_step" else f"1 prompt, {steps}+{sr_steps} steps")
            rows.append({
                **info, "command": command, "suite": "generate", "model": "tiny", "what": what, "stage": stage,
                "backend": backend, "dtype": PRECISION[backend], "shape": shape,
                "median_ms": round(st.median * 1e3, 3), "min_ms": round(st.minimum * 1e3, 3),
                "max_ms": round(st.maximum * 1e3, 3), "q1_ms": round(st.q1 * 1e3, 3), "q3_ms": round(st.q3 * 1e3, 3),
                "samples": st.samples,
                "ratio_vs_eager": _round(ratio[0]), "ratio_min": _round(ratio[1]), "ratio_max": _round(ratio[2]),
                "prepare_s": prepare_s[backend],
                "max_abs_diff_vs_eager": (round((images[backend] - images[EAGER]).abs().max().item(), 5)
                                          if what == "cascade" and EAGER in images else ""),
                "note": _note(runners[backend]["base"]), **load,
            })
    rows += [{**info, "command": command, **row, **load} for row in skipped]
    append_rows(out, rows)
    print(f"{info['device_name']} ({device}), torch {info['torch']}, onnxruntime {info['onnxruntime']}, "
          f"commit {info['commit']}")
    print(table(rows))
    print(f"appended {len(rows)} rows to {out}")
    return rows


def _round(value) -> float | str:
    return round(value, 3) if value != "" else ""


def _note(runner) -> str:
    session = getattr(runner, "session", None)  # an ONNX Runtime runner: its provider and threads
    if session is None:
        return ""
    threads = session.get_session_options().intra_op_num_threads  # 0: ORT's default
    options = (f"{threads} intra-op threads (torch's), sleeping workers" if threads else
               "ORT's default options: a thread per core, spinning workers")
    return f"onnxruntime {session.get_providers()[0]}, {options}"


def table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["what"] == "skipped":
            lines.append(["", "", r["backend"], "", "skipped", "", "", r["note"][:70]])
            continue
        ratio = f"{r['ratio_vs_eager']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
        lines.append([r["what"], r["stage"], r["backend"], r["dtype"],
                      f"{r['median_ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f})", ratio, f"{r['prepare_s']:.1f}",
                      r["note"]])
    header = ["what", "stage", "backend", "dtype", "ms (min-max)", "vs eager (min-max)", "prepare s", "note"]
    return format_table(header, lines)
