"""The native extension is built and used: `native_status()["cpu"]` is True wherever the package was installed
with a compiler (set DBFAST_ALLOW_NO_NATIVE=1 to accept the reference fallback). Without the extension the
package still imports and computes, with one warning that says how to rebuild."""

import os
import subprocess
import sys

import pytest
import torch

from dreambooth_fast import ops


@pytest.mark.skipif(os.environ.get("DBFAST_ALLOW_NO_NATIVE") == "1", reason="DBFAST_ALLOW_NO_NATIVE=1")
def test_cpu_native_ops_are_built():
    assert ops.native_status()["cpu"], "dreambooth_fast._C has no CPU kernels: `pip install --no-build-isolation -e .`"


def test_native_status_names_cpu_and_cuda():
    status = ops.native_status()
    assert set(status) == {"cpu", "cuda"} and all(isinstance(v, bool) for v in status.values())
    if torch.version.cuda is None:  # a CPU build of torch: no CUDA kernels can have been built
        assert status["cuda"] is False


_WITHOUT_EXTENSION = """
import sys, warnings
sys.modules["dreambooth_fast._C"] = None  # what a missing or unloadable extension looks like to the import
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    from dreambooth_fast import ops, reference
messages = [str(w.message) for w in caught if "dreambooth_fast" in str(w.message)]
assert len(messages) == 1 and "pip install --no-build-isolation -e ." in messages[0], messages
assert ops.native_status() == {"cpu": False, "cuda": False}
assert ops.native_cpu_kernels() is None
x0, eps, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([10, 900])
ac = torch.linspace(0.999, 0.01, 1000)
x_t, target = ops.add_noise(x0, eps, t, ac, "v_prediction")
assert torch.equal(x_t, reference.add_noise(x0, eps, t, ac, "v_prediction")[0])
assert ops.dreambooth_loss(x_t, target, None, 1, 0.5).shape == ()
w, b = torch.ones(3), torch.zeros(3)
assert torch.equal(ops.group_norm_act(x0, 3, w, b, act="silu"), reference.group_norm_act(x0, 3, w, b, act="silu"))
"""


def test_package_works_without_the_extension():
    done = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
