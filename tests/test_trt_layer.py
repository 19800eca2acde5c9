"""The decisions of the TensorRT layer, tested without TensorRT (it cannot be installed where these tests run):
small fakes stand in for the `tensorrt` module, builder config, engine and execution context, behaving as
TensorRT 10's Python API documents (None from create_timing_cache and create_execution_context on failure, False
from set_timing_cache on a mismatch, from set_input_shape, set_tensor_address and execute_async_v3 on failure).
Checked against TensorRT itself by scripts/gpu_check.sh on a GPU."""

from types import SimpleNamespace

import pytest
import torch

from dreambooth_fast.errors import UserError
from dreambooth_fast.export.onnx_export import UNetSpec
from dreambooth_fast.export.parity import TOLERANCES, check_engine_parity, reference_cases
from dreambooth_fast.export.runners import (
    activation_memory,
    create_context,
    enqueue,
    set_input_shapes,
    set_tensor_addresses,
)
from dreambooth_fast.export.tensorrt_build import attach_timing_cache

VALID_CACHE = b"timing cache of this GPU and TensorRT"
OTHER_GPU_CACHE = b"timing cache of another GPU"


class FakeBuilderConfig:
    """create_timing_cache reads the two blobs above and b"" (a new cache), anything else is unreadable (None);
    set_timing_cache rejects a cache of another GPU and, like TensorRT's binding, raises on None."""

    def __init__(self):
        self.attached = None

    def create_timing_cache(self, blob: bytes):
        return blob if blob in (b"", VALID_CACHE, OTHER_GPU_CACHE) else None

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        if cache is None:
            raise TypeError("set_timing_cache(): incompatible function arguments")
        if cache == OTHER_GPU_CACHE:
            return False
        self.attached = cache
        return True


@pytest.mark.parametrize("blob, attached", [(None, b""), (VALID_CACHE, VALID_CACHE), (OTHER_GPU_CACHE, b"")],
                         ids=["no-file", "valid", "other-gpu"])
def test_timing_cache_is_reused_when_valid_else_started_anew(tmp_path, blob, attached):
    path = tmp_path / "timing.cache"
    if blob is not None:
        path.write_bytes(blob)
    config, lines = FakeBuilderConfig(), []
    attach_timing_cache(config, path, lines.append)
    assert config.attached == attached
    assert lines == ([f"{path}: made by another GPU or TensorRT version; starting a new timing cache"]
                     if blob == OTHER_GPU_CACHE else [])


def test_unreadable_timing_cache_falls_back_to_an_empty_one_with_a_warning(tmp_path):
    path = tmp_path / "timing.cache"
    path.write_bytes(b"\x00truncated or from TensorRT 9")
    config = FakeBuilderConfig()
    with pytest.warns(RuntimeWarning, match="TensorRT cannot read this timing cache"):
        attach_timing_cache(config, path, print)
    assert config.attached == b""


FAKE_TRT = SimpleNamespace(ExecutionContextAllocationStrategy=SimpleNamespace(STATIC=0, USER_MANAGED=2))


class FakeContext:
    def __init__(self, strategy, *, accept_shapes=True, accept_addresses=True, enqueue_ok=True):
        self.strategy = strategy
        self.memory = None
        self.shapes = {}
        self.accept_shapes, self.accept_addresses, self.enqueue_ok = accept_shapes, accept_addresses, enqueue_ok
        self.streams = []

    def set_device_memory(self, memory: int, size: int) -> None:
        self.memory = (memory, size)

    def set_input_shape(self, name: str, shape) -> bool:
        self.shapes[name] = shape
        return self.accept_shapes

    def set_tensor_address(self, name: str, address: int) -> bool:
        return self.accept_addresses

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.streams.append(stream_handle)
        return self.enqueue_ok


class FakeEngine:
    """An engine needing `memory_size` bytes of activations; create_execution_context returns None (TensorRT's
    answer when it cannot allocate) after `contexts_possible` contexts."""

    def __init__(self, memory_size: int, contexts_possible: int = 8):
        self.device_memory_size_v2 = memory_size
        self.contexts_possible = contexts_possible
        self.contexts = []

    def create_execution_context(self, strategy=0):
        if len(self.contexts) == self.contexts_possible:
            return None
        self.contexts.append(FakeContext(strategy))
        return self.contexts[-1]


def test_contexts_are_user_managed_and_share_one_block_of_the_engine_size():
    engine = FakeEngine(memory_size=3 << 20)
    memory = activation_memory(engine, torch.device("cpu"))
    assert memory.numel() == 3 << 20 and memory.dtype == torch.uint8
    contexts = [create_context(FAKE_TRT, engine, memory, f"engine at batch {b}") for b in (1, 2, 8)]
    assert [c.strategy for c in contexts] == [FAKE_TRT.ExecutionContextAllocationStrategy.USER_MANAGED] * 3
    assert {c.memory for c in contexts} == {(memory.data_ptr(), 3 << 20)}


def test_engine_needing_no_activation_memory_still_gets_a_valid_block():
    assert activation_memory(FakeEngine(memory_size=0), torch.device("cpu")).numel() == 1


def test_failed_context_creation_is_a_user_error_naming_gpu_memory():
    engine = FakeEngine(memory_size=1024, contexts_possible=1)
    memory = activation_memory(engine, torch.device("cpu"))
    create_context(FAKE_TRT, engine, memory, "unet.fp16.engine at batch 1")
    with pytest.raises(UserError, match=r"unet\.fp16\.engine at batch 2: TensorRT could not create an execution "
                                        r"context \(out of GPU memory\?\)"):
        create_context(FAKE_TRT, engine, memory, "unet.fp16.engine at batch 2")


def test_refused_shapes_addresses_and_launches_are_errors_naming_what():
    buffers = {"sample": torch.zeros(2, 3, 4, 4)}
    set_input_shapes(FakeContext(2), {"sample": (2, 3, 4, 4)}, "engine")
    set_tensor_addresses(FakeContext(2), buffers, "engine")
    stream = SimpleNamespace(cuda_stream=1234)
    context = FakeContext(2)
    enqueue(context, stream, "engine")
    assert context.streams == [1234]  # the runner's own stream, not the legacy default stream (0)
    with pytest.raises(RuntimeError, match=r"engine at batch 2: TensorRT refused the shape \(2, 3, 4, 4\) of input "
                                           "'sample'"):
        set_input_shapes(FakeContext(2, accept_shapes=False), {"sample": (2, 3, 4, 4)}, "engine at batch 2")
    with pytest.raises(RuntimeError, match="engine: TensorRT refused the buffer of 'sample'"):
        set_tensor_addresses(FakeContext(2, accept_addresses=False), buffers, "engine")
    with pytest.raises(RuntimeError, match="engine: TensorRT could not enqueue the engine"):
        enqueue(FakeContext(2, enqueue_ok=False), stream, "engine")


# --- post-build parity: plain launches vs PyTorch, then CUDA-graph replay vs plain launches -------------------------

SPEC = UNetSpec(in_channels=3, sample_size=4, text_dim=8, has_class_labels=False)


def fake_runners(graph_fn):
    """make_runner for check_engine_parity: the plain runner is exact, the graph runner is graph_fn; records the
    order in which runners were made."""
    made = []

    def make_runner(cuda_graphs: bool):
        made.append(cuda_graphs)
        return graph_fn() if cuda_graphs else (lambda **inputs: inputs["sample"] * 2)

    return make_runner, made


def test_engine_parity_compares_graph_replay_with_plain_launches_at_both_batch_sizes_twice():
    cases = reference_cases(lambda **inputs: inputs["sample"] * 2, SPEC, (1, 2))
    make_runner, made = fake_runners(lambda: lambda **inputs: inputs["sample"] * 2)
    results, graph_results = check_engine_parity(cases, make_runner, TOLERANCES["fp16"], "test engine")
    assert made == [False, True]
    assert [r.batch for r in results] == [1, 2]
    assert [r.batch for r in graph_results] == [1, 2, 1, 2]
    assert all(r.max_abs == 0 for r in graph_results)


def test_graph_replay_that_goes_wrong_after_another_batch_size_fails_the_engine():
    # A replay clobbered by the other batch size's graph (shared activation memory misused): right the first
    # time each batch size runs, wrong when it comes round again.
    def graph_runner():
        seen = set()

        def run(**inputs):
            batch = inputs["sample"].shape[0]
            wrong = batch in seen
            seen.add(batch)
            return inputs["sample"] * 2 + (1.0 if wrong else 0.0)

        return run

    cases = reference_cases(lambda **inputs: inputs["sample"] * 2, SPEC, (1, 2))
    make_runner, _ = fake_runners(graph_runner)
    with pytest.raises(UserError, match=r"test engine, CUDA graph replay: parity check against its plain launches "
                                        r"failed at batch 1: max abs error 1"):
        check_engine_parity(cases, make_runner, TOLERANCES["fp16"], "test engine")
