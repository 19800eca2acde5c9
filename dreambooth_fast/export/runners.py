"""Runners over exported UNets, with the runner contract of the sampler
`unet_fn(sample, timestep, encoder_hidden_states, class_labels=None) -> Tensor` (the UNet's full 6-channel output).

  onnx  ONNX Runtime on an exported graph: the CUDA provider when asked for and installed (onnxruntime-gpu),
        else the CPU; outputs come back on the sample's device and in its dtype
  trt   a TensorRT engine with buffers allocated once per batch size and, by default, a CUDA graph per batch
        size (one execution context each, as a captured graph fixes shapes and addresses; the contexts share one
        block of activation memory and run in turn on the runner's own CUDA stream)

The eager and torch.compile backends need no export and stay with the sampler (sample.torch_unet_fn,
generate.unet_runner). Before loading, `make_unet_runner` checks that the export was made from the weights
now in the stage directory (and, for TensorRT, with this TensorRT on this GPU); a stale export is refused
with the command that refreshes it, never used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import UserError
from .manifest import manifest_path, read_manifest, stale_reasons, weights_record
from .onnx_export import onnx_file_name, require_onnx
from .tensorrt_build import engine_file_name, import_tensorrt, tensorrt_environment

if TYPE_CHECKING:
    import onnxruntime as ort

EXPORT_BACKENDS = ("onnx", "trt")
UnetFn = Callable[..., torch.Tensor]
_NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def unet_inputs(names: list[str], sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                class_labels=None) -> dict[str, torch.Tensor]:
    """The graph inputs for one call: timestep (a number, a 0-d, [1] or [batch] tensor) and class labels
    broadcast to [batch] float32."""
    batch = sample.shape[0]

    def per_sample(value) -> torch.Tensor:
        value = torch.as_tensor(value, device=sample.device).float().reshape(-1)
        return value.expand(batch) if value.numel() == 1 else value

    inputs = {"sample": sample, "timestep": per_sample(timestep), "encoder_hidden_states": encoder_hidden_states}
    if "class_labels" in names:
        if class_labels is None:
            raise ValueError("this UNet (stage II) needs class_labels, the noise-augmentation level")
        inputs["class_labels"] = per_sample(class_labels)
    return inputs


def onnx_session_options() -> ort.SessionOptions:
    """ONNX Runtime session options for a UNet runner: all graph optimisations; as many intra-op threads as torch
    has (so `torch.set_num_threads` governs both backends alike, and a comparison with eager torch uses as many
    cores); one inter-op thread, nodes run in order; worker threads that sleep instead of spinning between and
    after runs. ORT's defaults (a thread per physical core, spinning) measured worse on the shared 2-core CPU:
    spinning workers take the cores the sampler's torch code and other processes need, and a parallel node waits
    for a descheduled worker (BENCHMARKS.md, Generation)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class OnnxRunner:
    """ONNX Runtime session over an exported UNet graph (options: onnx_session_options); returns tensors on the
    sample's device and dtype. On the CPU, inputs and output cross without a copy (numpy views), which is why
    there is no IO binding here: the Python side of a call is about 0.1 ms of a 50 ms tiny-base step."""

    def __init__(self, onnx_path: str | Path, device: str = "cpu", options: ort.SessionOptions | None = None):
        """`options`: default onnx_session_options(); the generate benchmark passes ORT's own defaults to compare."""
        require_onnx()
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = options if options is not None else onnx_session_options()
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        self.input_types = {i.name: _NUMPY_DTYPES.get(i.type, np.float32) for i in self.session.get_inputs()}

    def feed(self, sample, timestep, encoder_hidden_states, class_labels=None) -> dict[str, np.ndarray]:
        """The graph's inputs as numpy arrays: CPU tensors of the graph's dtype are viewed, not copied."""
        inputs = unet_inputs(list(self.input_types), sample, timestep, encoder_hidden_states, class_labels)
        return {name: value.detach().cpu().numpy().astype(self.input_types[name], copy=False)
                for name, value in inputs.items()}

    def __call__(self, sample, timestep, encoder_hidden_states, class_labels=None) -> torch.Tensor:
        (output,) = self.session.run(None, self.feed(sample, timestep, encoder_hidden_states, class_labels))
        return torch.from_numpy(output).to(device=sample.device, dtype=sample.dtype)


def activation_memory(engine, device: torch.device) -> torch.Tensor:
    """One block of device memory for the activations of every execution context of `engine`. Its size,
    `device_memory_size_v2`, is the most any context needs (at the largest shapes of the profile). The contexts
    can share it because they run one after another on one stream. PyTorch's CUDA allocator aligns blocks to 512
    bytes; TensorRT asks for 256."""
    return torch.empty(max(engine.device_memory_size_v2, 1), dtype=torch.uint8, device=device)


def create_context(trt, engine, memory: torch.Tensor, what: str):
    """An execution context whose activations live in `memory` (see activation_memory) instead of a block of its
    own, as TensorRT's default static allocation would reserve for each context."""
    context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    if context is None:  # TensorRT logs why; the usual reason is GPU memory
        raise UserError(f"{what}: TensorRT could not create an execution context (out of GPU memory?)")
    context.set_device_memory(memory.data_ptr(), memory.numel())
    return context


def set_input_shapes(context, shapes: dict[str, tuple[int, ...]], what: str) -> None:
    for name, shape in shapes.items():
        if not context.set_input_shape(name, shape):
            raise RuntimeError(f"{what}: TensorRT refused the shape {shape} of input {name!r}")


def set_tensor_addresses(context, buffers: dict[str, torch.Tensor], what: str) -> None:
    for name, buffer in buffers.items():
        if not context.set_tensor_address(name, buffer.data_ptr()):
            raise RuntimeError(f"{what}: TensorRT refused the buffer of {name!r}")


def enqueue(context, stream: torch.cuda.Stream, what: str) -> None:
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError(f"{what}: TensorRT could not enqueue the engine (see its log above)")


@dataclass
class _BatchState:
    context: object
    buffers: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph | None


class TensorRTRunner:
    """A TensorRT engine as a UNet runner. Per batch size: an execution context, input/output buffers allocated
    once, and (cuda_graphs=True) the engine's launch captured as a CUDA graph and replayed on later calls. All
    contexts share one block of activation memory. The engine runs on a stream of the runner's own, which waits
    for the caller's current stream and which the caller's stream then waits for."""

    def __init__(self, engine_path: str | Path, *, cuda_graphs: bool = True):
        self.trt = import_tensorrt()
        self.engine_path = Path(engine_path)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))  # must outlive the engine
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise UserError(f"{self.engine_path}: TensorRT cannot load this engine; rebuild it: `dbfast export --trt`")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {n: self.engine.get_tensor_mode(n) for n in names}
        self.input_names = [n for n in names if modes[n] == self.trt.TensorIOMode.INPUT]
        self.output_name = next(n for n in names if modes[n] == self.trt.TensorIOMode.OUTPUT)
        torch_dtypes = {self.trt.float32: torch.float32, self.trt.float16: torch.float16}
        self.dtypes = {n: torch_dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        low, _, high = self.engine.get_tensor_profile_shape("sample", 0)
        self.batch_range = (low[0], high[0])
        self.cuda_graphs = cuda_graphs
        self.stream = torch.cuda.Stream(self.device)
        self.memory: torch.Tensor | None = None  # allocated with the first context
        self.states: dict[int, _BatchState] = {}

    def _prepare(self, batch: int) -> _BatchState:
        what = f"{self.engine_path} at batch {batch}"
        if self.memory is None:
            self.memory = activation_memory(self.engine, self.device)
        context = create_context(self.trt, self.engine, self.memory, what)
        shapes = {name: (batch, *tuple(self.engine.get_tensor_shape(name))[1:]) for name in self.input_names}
        set_input_shapes(context, shapes, what)
        buffers = {name: torch.zeros(shape, dtype=self.dtypes[name], device=self.device)
                   for name, shape in shapes.items()}
        output_shape = tuple(context.get_tensor_shape(self.output_name))
        buffers[self.output_name] = torch.empty(output_shape, dtype=self.dtypes[self.output_name], device=self.device)
        set_tensor_addresses(context, buffers, what)
        # One launch after setting shapes lets TensorRT finish its deferred set-up before a graph is captured.
        self.stream.wait_stream(torch.cuda.current_stream())  # the buffers were zeroed on the caller's stream
        enqueue(context, self.stream, what)
        graph = None
        if self.cuda_graphs:
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                enqueue(context, self.stream, what)
        return _BatchState(context, buffers, graph)

    def __call__(self, sample, timestep, encoder_hidden_states, class_labels=None) -> torch.Tensor:
        batch = sample.shape[0]
        if not self.batch_range[0] <= batch <= self.batch_range[1]:
            raise UserError(f"{self.engine_path}: UNet batch {batch} is outside the engine's profile "
                            f"{self.batch_range[0]}..{self.batch_range[1]}; rebuild with `dbfast export --trt "
                            "--batch-sizes MIN:OPT:MAX` covering it")
        with torch.cuda.device(self.device):
            inputs = unet_inputs(self.input_names, sample, timestep, encoder_hidden_states, class_labels)
            state = self.states.get(batch)
            if state is None:
                state = self.states[batch] = self._prepare(batch)
            caller = torch.cuda.current_stream()
            for name, value in inputs.items():
                state.buffers[name].copy_(value)  # on the caller's stream, after whatever produced the inputs
            self.stream.wait_stream(caller)
            if state.graph is not None:
                with torch.cuda.stream(self.stream):
                    state.graph.replay()
            else:
                enqueue(state.context, self.stream, f"{self.engine_path} at batch {batch}")
            caller.wait_stream(self.stream)
            return state.buffers[self.output_name].to(device=sample.device, dtype=sample.dtype, copy=True)


def _pick_precision(stage_out: Path, file_name: Callable[[str], str], default: str) -> str:
    """The precision whose export exists, when exactly one does; else `default`."""
    found = [p for p in ("fp16", "fp32") if manifest_path(stage_out / file_name(p)).is_file()]
    return found[0] if len(found) == 1 else default


def _checked_manifest(path: Path, stage: str, stage_dir: Path | None, flag: str, current: dict | None = None) -> None:
    """Refuse a missing or stale export: other weights than the stage directory's (default: the directory it
    was exported from), or another TensorRT/GPU than `current` describes."""
    manifest = read_manifest(manifest_path(path))
    fix = f"run `dbfast export --model MODEL {flag}` for this cascade"
    if manifest is None or not path.is_file():
        raise UserError(f"{path}: no {stage} export here; {fix}")
    stage_dir = Path(stage_dir if stage_dir is not None else manifest["source"])
    if not (stage_dir / "unet").is_dir():
        raise UserError(f"{path}: cannot check it against its weights, {stage_dir}/unet is gone; {fix}")
    current = {**(current or {}), "weights_sha256": weights_record(stage_dir, manifest["weights"])["sha256"]}
    reasons = stale_reasons(manifest, current)
    if reasons:
        raise UserError(f"{path} is stale ({'; '.join(reasons)}); {fix}")


def make_unet_runner(backend: str, stage: str, export_dir: str | Path, *, stage_dir: str | Path | None = None,
                     precision: str | None = None, device: str = "cpu", cuda_graphs: bool = True) -> UnetFn:
    """The runner of one cascade stage ("base" or "sr") from `export_dir` (the `dbfast export --out` folder) on
    backend "onnx" or "trt". `stage_dir` is the stage's model directory whose weights the export must match
    (default: the directory it was exported from, as its manifest records). `precision` picks the export
    (default: the only one there, else fp32 for onnx and fp16 for trt). `device` "cuda" runs onnx on ONNX
    Runtime's CUDA provider when installed; trt always runs on the current CUDA device."""
    if backend not in EXPORT_BACKENDS:
        raise UserError(f"--backend {backend}: exported backends are {', '.join(EXPORT_BACKENDS)}")
    trt = import_tensorrt() if backend == "trt" else None
    stage_out = Path(export_dir) / stage
    if backend == "onnx":
        path = stage_out / onnx_file_name(precision or _pick_precision(stage_out, onnx_file_name, "fp32"))
        _checked_manifest(path, stage, stage_dir, "--onnx")
        return OnnxRunner(path, device)
    path = stage_out / engine_file_name(precision or _pick_precision(stage_out, engine_file_name, "fp16"))
    _checked_manifest(path, stage, stage_dir, "--trt", tensorrt_environment(trt))
    return TensorRTRunner(path, cuda_graphs=cuda_graphs)
