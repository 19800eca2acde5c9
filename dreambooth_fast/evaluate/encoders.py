"""The networks `dbfast eval` measures with: CLIP and DINO image encoders, and LPIPS (for DIV).

Encoders load from local transformers-format directories only (`local_files_only=True`). Image preprocessing
uses the PIL backend of the saved image processor (`AutoImageProcessor.from_pretrained(dir, backend="pil")`,
e.g. CLIPImageProcessorPil, ViTImageProcessorPil), so torchvision is never needed. LPIPS is v0.1 over
AlexNet, built in plain torch; its weights come from `--lpips DIR` (see `load_lpips`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..errors import UserError

BATCH = 16


# ---- CLIP and DINO --------------------------------------------------------------------------------------

def check_model_dir(path: str | Path, option: str) -> Path:
    """`path` as a Path if it looks like a saved transformers model with its image processor, else a UserError."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{option} {path}: no config.json; give a local transformers model directory "
                        "(the files save_pretrained writes, with its preprocessor_config.json)")
    if not (path / "preprocessor_config.json").is_file():
        raise UserError(f"{option} {path}: no preprocessor_config.json; save the model's image processor there too")
    return path


def _load_image_processor(path: Path):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path, backend="pil", local_files_only=True)


@dataclass
class ImageEncoder:
    """A transformers vision model and its (PIL) image processor; `embed` gives one row per image."""

    model: torch.nn.Module
    processor: object
    kind: str  # "clip" or "dino"

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.kind == "clip":
            out = self.model.get_image_features(pixel_values=pixel_values)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]

    @torch.inference_mode()
    def embed(self, images: list[Image.Image], progress: bool = False) -> torch.Tensor:
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        rows = []
        for start in tqdm(range(0, len(images), BATCH), desc=self.kind, disable=not progress, leave=False):
            pixels = self.processor(images=images[start:start + BATCH], return_tensors="pt")["pixel_values"]
            rows.append(self._features(pixels.to(device=device, dtype=dtype)).float().cpu())
        return torch.cat(rows)


@dataclass
class ClipEncoder(ImageEncoder):
    tokenizer: object = None

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out = self.model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                           attention_mask=tokens["attention_mask"].to(device))
        return (out if isinstance(out, torch.Tensor) else out.pooler_output).float().cpu()


def load_clip(path: str | Path, device: str = "cpu") -> ClipEncoder:
    """A CLIPModel, its tokenizer and its image processor from a local directory (`--clip`)."""
    from transformers import AutoConfig, AutoTokenizer, CLIPModel

    path = check_model_dir(path, "--clip")
    model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    if model_type != "clip":
        raise UserError(f"--clip {path}: its config.json is a {model_type!r} model; give a CLIPModel directory")
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        return ClipEncoder(model=model, processor=_load_image_processor(path), kind="clip",
                           tokenizer=AutoTokenizer.from_pretrained(path, local_files_only=True))
    except (OSError, ValueError) as err:
        raise UserError(f"--clip {path}: cannot load it ({str(err).splitlines()[0]})") from None


def load_dino(path: str | Path, device: str = "cpu") -> ImageEncoder:
    """A DINO ViT (e.g. facebook/dino-vits16, the paper's ViT-S/16) and its image processor (`--dino`)."""
    from transformers import AutoConfig, AutoModel

    path = check_model_dir(path, "--dino")
    model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    if model_type == "clip":
        raise UserError(f"--dino {path}: this is a CLIP model; give a DINO ViT directory (e.g. dino-vits16)")
    # DINO checkpoints have no pooler; ViTModel would otherwise add a randomly initialised one (unused).
    extra = {"add_pooling_layer": False} if model_type == "vit" else {}
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True, **extra).to(device).eval()
        return ImageEncoder(model=model, processor=_load_image_processor(path), kind="dino")
    except (OSError, ValueError) as err:
        raise UserError(f"--dino {path}: cannot load it ({str(err).splitlines()[0]})") from None


# ---- LPIPS ----------------------------------------------------------------------------------------------

# torchvision's AlexNet `features` (conv indices 0, 3, 6, 8, 10) as (in, out, kernel, stride, padding), and
# where LPIPS taps it: after each conv's ReLU, max-pooling before convs 3 and 6.
_ALEX_CONVS = {0: (3, 64, 11, 4, 2), 3: (64, 192, 5, 1, 2), 6: (192, 384, 3, 1, 1), 8: (384, 256, 3, 1, 1),
               10: (256, 256, 3, 1, 1)}
_POOL_BEFORE = (3, 6)
LPIPS_BACKBONE = "alexnet"
LPIPS_LINEAR = "lpips_alex"


class Lpips(torch.nn.Module):
    """LPIPS v0.1 with the AlexNet trunk (Zhang et al. 2018; the `lpips` package's default `net="alex"`)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.ModuleDict({str(i): torch.nn.Conv2d(cin, cout, k, stride=s, padding=p)
                                             for i, (cin, cout, k, s, p) in _ALEX_CONVS.items()})
        self.lins = torch.nn.ModuleList(torch.nn.Conv2d(conv[1], 1, 1, bias=False) for conv in _ALEX_CONVS.values())
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        taps = []
        for index, conv in self.features.items():
            if int(index) in _POOL_BEFORE:
                x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = F.relu(conv(x))
            taps.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return taps

    @torch.inference_mode()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distances (batch,) between images `a` and `b`, (batch, 3, H, W) in [-1, 1]."""
        return sum(lin((fa - fb) ** 2).mean(dim=(1, 2, 3)) for lin, fa, fb in zip(self.lins, self._taps(a),
                                                                                   self._taps(b)))


def _read_weights(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / f"{stem}.safetensors").is_file():
        return load_file(folder / f"{stem}.safetensors")
    if (folder / f"{stem}.pth").is_file():
        try:
            return torch.load(folder / f"{stem}.pth", map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
            raise UserError(f"--lpips {folder / (stem + '.pth')}: not a plain state dict of tensors ({err})") from None
    raise UserError(f"--lpips {folder}: {stem}.safetensors or {stem}.pth is missing (see `dbfast eval --help`)")


def load_lpips(path: str | Path, device: str = "cpu") -> Lpips:
    """LPIPS from `path`, which must hold two state dicts, each as .safetensors or .pth (read weights_only):

    - `alexnet.*`: torchvision's ImageNet AlexNet weights (e.g. `alexnet-owt-7be5be79.pth`, renamed); keys
      `features.{0,3,6,8,10}.{weight,bias}` are used, the rest (`classifier.*`) ignored.
    - `lpips_alex.*`: the `lpips` package's linear layers, `lpips/weights/v0.1/alex.pth` renamed; keys
      `lin{0..4}.model.1.weight`.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"--lpips {folder}: not a directory")
    backbone, linear = _read_weights(folder, LPIPS_BACKBONE), _read_weights(folder, LPIPS_LINEAR)
    state = {f"features.{i}.{p}": backbone.get(f"features.{i}.{p}") for i in _ALEX_CONVS for p in ("weight", "bias")}
    state |= {f"lins.{k}.weight": linear.get(f"lin{k}.model.1.weight") for k in range(len(_ALEX_CONVS))}
    missing = [key for key, value in state.items() if value is None]
    if missing:
        raise UserError(f"--lpips {folder}: the weights lack {', '.join(missing[:3])}...: expected torchvision "
                        f"AlexNet in {LPIPS_BACKBONE}.* and lpips v0.1 alex.pth in {LPIPS_LINEAR}.*")
    net = Lpips()
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise UserError(f"--lpips {folder}: weight shapes do not match AlexNet/LPIPS ({err})") from None
    return net.to(device).eval()


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float in [-1, 1], LPIPS's input range."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy())
    return (pixels.permute(2, 0, 1) / 127.5 - 1.0).unsqueeze(0)
