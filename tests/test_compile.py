"""--compile: a compiled run trains the same model as an eager one (within float tolerance); a compile failure is
one line and the run goes on eagerly; a bad value is refused."""

import pytest
import torch
from runs import assert_refused, train, unet_weights

COMMON = ["--stages", "base", "--no-prior", "--steps", "2", "--batch-size", "2"]


@pytest.mark.slow  # Inductor compiles the UNet's forward and backward: about a minute on a 2-core CPU
def test_a_compiled_run_trains_the_eager_runs_model(tiny_cascade, subject_dir, tmp_path):
    assert train(tiny_cascade, subject_dir, tmp_path / "eager", *COMMON).exit_code == 0
    result = train(tiny_cascade, subject_dir, tmp_path / "compiled", *COMMON, "--compile")
    assert result.exit_code == 0, result.output
    assert "torch.compile failed" not in result.output
    eager, compiled, start = (unet_weights(tmp_path / "eager"), unet_weights(tmp_path / "compiled"),
                              unet_weights(tiny_cascade))
    assert any(not torch.equal(v, start[k]) for k, v in compiled.items())
    for key, value in compiled.items():
        torch.testing.assert_close(value, eager[key], rtol=1e-4, atol=1e-5)


def test_a_failing_compile_is_one_line_and_the_run_trains_eagerly(tiny_cascade, subject_dir, tmp_path, monkeypatch):
    from dreambooth_fast import compiled

    def broken(forward):
        def fails(*args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

        return fails

    monkeypatch.setattr(compiled.torch, "compile", broken)
    assert train(tiny_cascade, subject_dir, tmp_path / "eager", *COMMON).exit_code == 0
    result = train(tiny_cascade, subject_dir, tmp_path / "run", *COMMON, "--compile")
    assert result.exit_code == 0, result.output
    # One line (the first line of the error), once; the progress bar may share the captured line.
    assert result.output.count("torch.compile failed") == 1
    assert ("--compile: torch.compile failed for the base UNet (InvalidCxxCompiler: No working C++ compiler found); "
            "training it eagerly\n") in result.output
    eager, tuned = unet_weights(tmp_path / "eager"), unet_weights(tmp_path / "run")
    assert all(torch.equal(v, eager[k]) for k, v in tuned.items())


def test_compile_from_a_config_file_must_be_true_or_false(tiny_cascade, subject_dir, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('compile = "yes"\n')
    out = tmp_path / "out"
    assert_refused(train(tiny_cascade, subject_dir, out, "--config", config), "--compile", "bool", out=out)
