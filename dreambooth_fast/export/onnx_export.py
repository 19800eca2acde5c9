"""ONNX export of one cascade UNet: named inputs, dynamic batch, opset >= 18, external data past 2 GiB.

Exporter: torch.onnx.export with dynamo=True (torch.export + onnxscript, the default in torch 2.9+). It was
chosen over the TorchScript tracer because torch.export checks shape-dependent Python branches (diffusers has
some on the batch size) against the declared dynamic batch range instead of silently baking the traced value,
the graph comes out a third the size, and `optimize=True` runs the onnxscript optimizer (constant folding,
dead-code and unused-initializer removal) as the clean-up pass. diffusers' attention processors (SDPA and the
added-KV processor IF uses) export unchanged.

Graph interface (the same for ONNX Runtime and TensorRT):
  sample                [batch, C, H, W]       model dtype (fp32 or fp16)
  timestep              [batch]                float32 (the UNet embeds it in float32 either way)
  encoder_hidden_states [batch, 77, D]         model dtype; T5 (IF) or CLIP (Stable Diffusion) prompt embeddings
  class_labels          [batch]                float32; stage II only: the noise-augmentation level
  out_sample            [batch, C, H, W]       model dtype; IF: epsilon and the learned-range variance (6 channels);
                                               Stable Diffusion: epsilon or v on the latents (4 channels)
A Stable Diffusion UNet is the same interface on latents: C = the VAE's latent channels, H = W = the latent size
(SD 1.5: 4 x 64 x 64; SD 2.1: 4 x 96 x 96), text length the tokenizer's (77), D the CLIP width (768 or 1024).
The x4 upscaler's UNet takes the latents plus the low-res image (C = 4 + 3 in, 4 out; 128 x 128 nominal) and the
noise level as class_labels, which index its class embedding: the graph casts them to int64 itself. It upscales
images of any size (the base's: SD 1.5's 512 px in, 2048 out), so its graph's H and W are dynamic too (multiples
of its downsampling factor; parity is checked at the nominal size, and TensorRT engines of it are not built yet).

The text encoder is not exported; prompt embeddings are the exported graphs' input tensors instead. T5 runs
once per prompt while each UNet runs once per denoising step (IF: 100 + 50 steps, twice the batch under
guidance), so the UNets are where the time goes; T5-XXL is 4.7B parameters (a second multi-GB export and
engine) and is known to overflow in fp16. `dbfast generate` encodes the prompts once per call in PyTorch and
frees the encoder before sampling; a server can keep the embedding tensors of its prompts and never load T5.
Stable Diffusion's VAE decoder stays in PyTorch for the same reason: it runs once per image, after the last step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..models import check_sr_family, check_stage_dir, find_sr_dir, model_family
from ..sd import prompt_length
from ..sdxl import unet_kwargs

DEFAULT_OPSET = 18
EXTERNAL_DATA_THRESHOLD = 2**31  # protobuf cannot hold a model of 2 GiB or more in one file
TEXT_LENGTH = 77  # IF pads prompts to 77 tokens
OUTPUT_NAME = "out_sample"


def require_onnx() -> None:
    """Raise a UserError naming the install command when the optional ONNX packages are missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise UserError(f"ONNX export and the onnx backend need onnx, onnxscript and onnxruntime ({err}); "
                        "install them with `pip install 'dreambooth-fast[onnx]'`") from None


def cascade_stages(model_dir: str | Path, sr_model_dir: str | Path | None = None) -> list[tuple[str, Path]]:
    """The stage directories of a cascade: ("base", model_dir) and ("sr", sr_model_dir or model_dir/stage_2)
    when there is one; each checked to be a stage directory of the base's family (Stable Diffusion's SR stage: the
    x4 upscaler)."""
    base_dir = Path(model_dir)
    check_stage_dir(base_dir, "base")
    stages = [("base", base_dir)]
    if model_family(base_dir) == "sdxl":
        if sr_model_dir is not None:
            raise UserError("--sr-model: SDXL has no SR stage here (its refiner is not supported); export the base "
                            "model alone")
        return stages
    sr_dir = find_sr_dir(base_dir, sr_model_dir)
    if sr_dir is not None:
        check_stage_dir(sr_dir, "sr")
        check_sr_family(sr_dir, model_family(base_dir))
        stages.append(("sr", sr_dir))
    return stages


@dataclass(frozen=True)
class UNetSpec:
    """The input shapes of one UNet, from its config."""

    in_channels: int
    sample_size: int
    text_dim: int
    has_class_labels: bool
    text_length: int = TEXT_LENGTH
    size_multiple: int = 0  # 0: H and W fixed at sample_size; else dynamic, multiples of this (the x4 upscaler)

    @property
    def input_names(self) -> list[str]:
        names = ["sample", "timestep", "encoder_hidden_states"]
        return names + ["class_labels"] if self.has_class_labels else names

    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        shapes = {
            "sample": (batch, self.in_channels, self.sample_size, self.sample_size),
            "timestep": (batch,),
            "encoder_hidden_states": (batch, self.text_length, self.text_dim),
        }
        if self.has_class_labels:
            shapes["class_labels"] = (batch,)
        return shapes

    def example_inputs(self, batch: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random inputs of the graph's names, shapes and dtypes; timesteps and noise levels spread over [0, 999]."""
        gen = torch.Generator().manual_seed(seed)
        levels = torch.linspace(999, 0, batch).round()
        inputs = {
            "sample": torch.randn(self.shapes(batch)["sample"], generator=gen).to(dtype),
            "timestep": levels,
            "encoder_hidden_states": torch.randn(self.shapes(batch)["encoder_hidden_states"], generator=gen).to(dtype),
        }
        if self.has_class_labels:
            inputs["class_labels"] = levels.flip(0)
        return inputs


def stage_text_length(stage_dir: str | Path) -> int:
    """The prompt length a stage's UNet is fed: IF's 77 tokens, or what the Stable Diffusion tokenizer pads to (for
    SDXL one more: the row that carries the pooled embedding and the time ids, sdxl.pack)."""
    family = model_family(Path(stage_dir))
    if family == "if":
        return TEXT_LENGTH
    return prompt_length(stage_dir) + (family == "sdxl")


def unet_spec(unet, text_length: int = TEXT_LENGTH) -> UNetSpec:
    """Read a UNet2DConditionModel's input shapes from its config."""
    config = unet.config
    # Class labels that index an embedding are the x4 upscaler's noise level: it takes images of any size.
    indexed_labels = bool(getattr(config, "num_class_embeds", None)) and config.class_embed_type is None
    return UNetSpec(
        in_channels=config.in_channels, sample_size=config.sample_size,
        text_dim=config.encoder_hid_dim or config.cross_attention_dim,
        has_class_labels=config.class_embed_type is not None or bool(getattr(config, "num_class_embeds", None)),
        text_length=text_length,
        size_multiple=2 ** (len(config.block_out_channels) - 1) if indexed_labels else 0,
    )


def onnx_file_name(precision: str) -> str:
    return f"unet.{precision}.onnx"


class UNetGraph(torch.nn.Module):
    """The UNet with positional tensor inputs and one tensor output, as the exported graph has them: class labels
    come in as float32 and index the class embedding as int64 where the UNet has one (the x4 upscaler's noise level;
    IF's stage II embeds its level like a timestep). An SDXL UNet's graph takes the packed embedding and unpacks it,
    so its inputs are the same three (sdxl.unet_kwargs)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.indexed_labels = isinstance(getattr(unet, "class_embedding", None), torch.nn.Embedding)

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None):
        if class_labels is not None and self.indexed_labels:
            class_labels = class_labels.long()
        return self.unet(sample, timestep, **unet_kwargs(self.unet.config, encoder_hidden_states, class_labels),
                         return_dict=False)[0]


def _model_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def export_unet_onnx(unet, spec: UNetSpec, path: str | Path, *, opset: int = DEFAULT_OPSET,
                     external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Export `unet` (in its current dtype) to `path`, check it with onnx.checker by path, return the files
    written: `path`, plus `path`.data when the weights reach `external_data_threshold` bytes."""
    require_onnx()
    import onnx

    path = Path(path)
    dtype = next(unet.parameters()).dtype
    inputs = spec.example_inputs(2, dtype)  # batch 2: torch.export specialises sizes 0 and 1
    batch = torch.export.Dim("batch", min=1)
    dynamic = [{0: batch} for _ in inputs]
    if spec.size_multiple:  # square images of any size: one dynamic side, a multiple of the downsampling factor
        side = spec.size_multiple * torch.export.Dim("side", min=1, max=4096 // spec.size_multiple)
        dynamic[0] = {0: batch, 2: side, 3: side}
    external = _model_bytes(unet) >= external_data_threshold
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter chatter about diffusers internals; failures still raise
        program = torch.onnx.export(
            UNetGraph(unet).eval(), tuple(inputs.values()), input_names=list(inputs), output_names=[OUTPUT_NAME],
            opset_version=opset, dynamo=True, dynamic_shapes=tuple(dynamic), optimize=True,
            verbose=False,
        )
    program.save(path, external_data=external)
    onnx.checker.check_model(str(path), full_check=True)
    data = path.with_name(path.name + ".data")
    return [path, data] if external else [path]
