"""Parity of an exported UNet against PyTorch: max abs error and cosine similarity at two batch sizes; for a
TensorRT engine also its CUDA-graph path against its plain launches.

The reference is the PyTorch UNet in float32 on the CPU, computed once per stage on fixed random inputs; every
exported graph or engine of that stage is compared with it. Tolerances (outputs are epsilon predictions and
variances, of order 1):
  fp32: max abs error <= 1e-3 and cosine >= 0.99999  (ONNX Runtime vs PyTorch differ only in summation order)
  fp16: max abs error <= 5e-2 and cosine >= 0.999    (half-precision weights and activations vs float32)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import UserError
from .onnx_export import UNetSpec

UnetFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Tolerance:
    max_abs: float
    min_cosine: float


TOLERANCES = {"fp32": Tolerance(1e-3, 0.99999), "fp16": Tolerance(5e-2, 0.999)}


@dataclass(frozen=True)
class ParityResult:
    batch: int
    max_abs: float
    cosine: float

    def as_dict(self) -> dict:
        return {"batch": self.batch, "max_abs": self.max_abs, "cosine": self.cosine}

    def __str__(self) -> str:
        return f"batch {self.batch}: max abs error {self.max_abs:.3g}, cosine {self.cosine:.6f}"


def reference_cases(unet_fn: UnetFn, spec: UNetSpec, batch_sizes: Sequence[int],
                    seed: int = 0) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """(inputs, expected output) pairs from the reference runner at each batch size, inputs in float32."""
    cases = []
    for batch in batch_sizes:
        inputs = spec.example_inputs(batch, torch.float32, seed=seed + batch)
        with torch.no_grad():
            cases.append((inputs, unet_fn(**inputs).float().cpu()))
    return cases


def compare(expected: torch.Tensor, actual: torch.Tensor) -> tuple[float, float]:
    """Max abs error and cosine similarity (flattened), computed in float64."""
    expected, actual = expected.double().flatten(), actual.detach().double().cpu().flatten()
    max_abs = (expected - actual).abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(expected, actual, dim=0, eps=1e-30).item()
    return max_abs, cosine


def check_parity(cases: list[tuple[dict[str, torch.Tensor], torch.Tensor]], candidate: UnetFn, tolerance: Tolerance,
                 what: str, against: str = "PyTorch") -> list[ParityResult]:
    """Run `candidate` on each case and compare with the expected output (of `against`). Raises UserError naming
    `what`, the numbers and the tolerance when any case is past the tolerance (or not finite)."""
    results = []
    for inputs, expected in cases:
        result = ParityResult(inputs["sample"].shape[0], *compare(expected, candidate(**inputs)))
        if not (result.max_abs <= tolerance.max_abs and result.cosine >= tolerance.min_cosine):
            raise UserError(
                f"{what}: parity check against {against} failed at {result} (tolerance: max abs error "
                f"<= {tolerance.max_abs:g}, cosine >= {tolerance.min_cosine:g}); the export was not kept"
            )
        results.append(result)
    return results


def check_engine_parity(cases: list[tuple[dict[str, torch.Tensor], torch.Tensor]],
                        make_runner: Callable[[bool], UnetFn], tolerance: Tolerance,
                        what: str) -> tuple[list[ParityResult], list[ParityResult]]:
    """Parity of an engine on both of its paths: plain launches (make_runner(False)) against PyTorch, then CUDA-graph
    replay (make_runner(True), the path generation takes) against the plain launches on the same inputs. The graph
    runner gets the batch sizes twice in turn, so a replay also follows another batch size's graph (they share
    activation memory). One runner exists at a time: each holds the engine's weights. Returns both lists."""
    plain = make_runner(False)
    results = check_parity(cases, plain, tolerance, what)
    plain_cases = [(inputs, plain(**inputs).float().cpu()) for inputs, _ in cases]
    del plain
    graph_results = check_parity(plain_cases * 2, make_runner(True), tolerance, f"{what}, CUDA graph replay",
                                 against="its plain launches")
    return results, graph_results
