"""The DreamBooth paper's metrics (DINO, CLIP-I, CLIP-T, PRES, DIV) over a directory of generated images.

Metric code is separate from generation: `score_generated` reads a directory laid out as below, whoever made
it; `generate_eval_images` / `generate_protocol` make one from a cascade through the project's sampler.

Generated-images layout (what `--generated DIR` reads): `DIR/manifest.json`, format "dbfast-eval/1",

    {"format": "dbfast-eval/1",
     "subject": [{"prompt": "a sks dog in the jungle", "clip_text": "a dog in the jungle",
                  "images": ["00/0000.png", "00/0001.png", ...]}, ...],   # one entry per prompt
     "class": {"prompt": "a dog", "images": ["25/0000.png", ...]}}        # optional: PRES needs it

Image paths are relative to DIR (any layout works; `generate_protocol` writes `{prompt:02d}/{image:04d}.png`,
the class prompt last). Other keys (model, identifier, class_noun, live) are informational. `clip_text` is the
text CLIP-T compares the images with (default: the prompt); the protocol uses the prompt without the
identifier, which means nothing to CLIP's tokenizer.

Definitions (embeddings are L2-normalised, similarity is cosine):
- DINO: mean over all (generated, real) pairs of the similarity of DINO ViT CLS embeddings
  (`last_hidden_state[:, 0]`, after the final layer norm, as DINO's own forward returns it).
- CLIP-I: the same with CLIP image embeddings (projected, `get_image_features`).
- CLIP-T: mean over generated images of the similarity between the image and its prompt's CLIP text embedding.
- PRES: DINO similarity between the real images and the images generated for `a {class}` (lower = less drift).
- DIV: per prompt, mean LPIPS distance over unordered pairs of its images, then the mean over prompts (higher =
  more diverse). LPIPS here is LPIPS v0.1 over AlexNet, built in plain torch (torchvision is not needed); its
  weights come from `--lpips DIR` (see `load_lpips`). Without them DIV falls back to 1 - DINO similarity of the
  same pairs, and the metric is reported as "DIV (1-DINO)": a different quantity, not comparable to the paper.
- Real images row: the same DINO and CLIP-I over unordered pairs of distinct real images (the ceiling).

Encoders load from local transformers-format directories only (`local_files_only=True`). Image preprocessing
uses the PIL backend of the saved image processor (`AutoImageProcessor.from_pretrained(dir, backend="pil")`,
e.g. CLIPImageProcessorPil, ViTImageProcessorPil), so torchvision is never needed.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..data import load_subject_images, read_image
from ..errors import UserError
from ..fileio import atomic_write_json

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dbfast-eval/1"
BATCH = 16

DIV_LPIPS = "DIV"
DIV_FALLBACK = "DIV (1-DINO)"

# The paper's rows (Ruiz et al. 2023): Table 1 (DINO, CLIP-I, CLIP-T) and Table 3 (Imagen; PRES, DIV with LPIPS).
PAPER_ROWS = [
    ("paper: real images", {"DINO": 0.774, "CLIP-I": 0.885}),
    ("paper: DreamBooth (Imagen)", {"DINO": 0.696, "CLIP-I": 0.812, "CLIP-T": 0.306}),
    ("paper: DreamBooth (Stable Diffusion)", {"DINO": 0.668, "CLIP-I": 0.803, "CLIP-T": 0.305}),
    ("paper: Textual Inversion", {"DINO": 0.569, "CLIP-I": 0.780, "CLIP-T": 0.255}),
    ("paper: Imagen, with prior preservation", {"PRES": 0.493, DIV_LPIPS: 0.391}),
    ("paper: Imagen, without prior preservation", {"PRES": 0.664, DIV_LPIPS: 0.371}),
]


# ---- images ---------------------------------------------------------------------------------------------

def load_real_images(folder: str | Path) -> list[Image.Image]:
    """The real subject photos, read as `dbfast train` reads them, so that DINO and CLIP-I see the trained pixels."""
    return [photo.image for photo in load_subject_images(folder, option="--real-images")]


# ---- similarity maths -----------------------------------------------------------------------------------

def cross_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs (row of `a`, row of `b`)."""
    return float((F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T).mean())


def within_similarity(x: torch.Tensor) -> float:
    """Mean cosine similarity over the unordered pairs of distinct rows of `x` (needs at least 2 rows)."""
    if x.shape[0] < 2:
        raise ValueError("within_similarity needs at least two rows")
    sims = F.normalize(x.double(), dim=-1) @ F.normalize(x.double(), dim=-1).T
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
    return float(sims[i, j].mean())


def paired_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of row i of `a` with row i of `b`."""
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


# ---- encoders -------------------------------------------------------------------------------------------

def _check_model_dir(path: str | Path, option: str) -> Path:
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

    path = _check_model_dir(path, "--clip")
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

    path = _check_model_dir(path, "--dino")
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


def mean_pairwise_lpips(lpips: Lpips, images: list[Image.Image]) -> float:
    """Mean LPIPS distance over the unordered pairs of `images` (all of one size)."""
    if len({im.size for im in images}) != 1:
        raise UserError(f"DIV: the images of one prompt differ in size ({sorted({im.size for im in images})})")
    device = lpips.shift.device
    tensors = [to_tensor(im).to(device) for im in images]
    pairs = list(itertools.combinations(range(len(images)), 2))
    a = torch.cat([tensors[i] for i, _ in pairs])
    b = torch.cat([tensors[j] for _, j in pairs])
    return float(lpips(a, b).mean())


# ---- scoring --------------------------------------------------------------------------------------------

def read_manifest(folder: str | Path) -> dict:
    """The validated manifest of a generated-images directory, with image paths made absolute."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"--generated {folder}: no {MANIFEST} (the layout is described in `dbfast eval --help`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path}: format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    entries = manifest.get("subject") or []
    if not entries:
        raise UserError(f"{path}: \"subject\" lists no prompts")
    for entry in entries + ([manifest["class"]] if manifest.get("class") else []):
        if not isinstance(entry.get("prompt"), str) or not entry.get("images"):
            raise UserError(f"{path}: every entry needs a \"prompt\" and a non-empty \"images\" list")
        entry["images"] = [folder / name for name in entry["images"]]
        for image in entry["images"]:
            if not image.is_file():
                raise UserError(f"{path}: lists {image}, which does not exist")
    return manifest


def score_generated(generated: str | Path, real_images: str | Path, clip: ClipEncoder, dino: ImageEncoder,
                    lpips: Lpips | None = None, progress: bool = False) -> dict:
    """Score a generated-images directory against the real subject photos; the results as a JSON-able dict."""
    manifest = read_manifest(generated)
    real = load_real_images(real_images)
    real_dino, real_clip = dino.embed(real), clip.embed(real)
    div_name = DIV_LPIPS if lpips is not None else DIV_FALLBACK

    per_prompt, all_dino, all_clip, text_sims, divs = [], [], [], [], []
    for entry in tqdm(manifest["subject"], desc="scoring prompts", disable=not progress):
        images = [read_image(p) for p in entry["images"]]
        gen_dino, gen_clip = dino.embed(images), clip.embed(images)
        text = clip.embed_texts([entry.get("clip_text") or entry["prompt"]]).expand(len(images), -1)
        row = {"prompt": entry["prompt"], "n": len(images), "DINO": cross_similarity(gen_dino, real_dino),
               "CLIP-I": cross_similarity(gen_clip, real_clip), "CLIP-T": paired_similarity(gen_clip, text),
               div_name: None}
        if len(images) > 1:
            row[div_name] = (mean_pairwise_lpips(lpips, images) if lpips is not None
                             else 1.0 - within_similarity(gen_dino))
            divs.append(row[div_name])
        per_prompt.append(row)
        all_dino.append(gen_dino)
        all_clip.append(gen_clip)
        text_sims.append(F.cosine_similarity(gen_clip, text, dim=-1))

    metrics = {"DINO": cross_similarity(torch.cat(all_dino), real_dino),
               "CLIP-I": cross_similarity(torch.cat(all_clip), real_clip),
               "CLIP-T": float(torch.cat(text_sims).mean()),
               "PRES": None,
               div_name: float(np.mean(divs)) if divs else None}
    n_class = 0
    if manifest.get("class"):
        class_images = [read_image(p) for p in manifest["class"]["images"]]
        n_class = len(class_images)
        metrics["PRES"] = cross_similarity(dino.embed(class_images), real_dino)
    real_row = ({"DINO": within_similarity(real_dino), "CLIP-I": within_similarity(real_clip)} if len(real) > 1
                else {"DINO": None, "CLIP-I": None})
    return {
        "metrics": metrics,
        "div_metric": div_name,
        "div_definition": ("mean LPIPS (v0.1, AlexNet) over pairs of images of the same prompt" if lpips is not None
                           else "1 - mean DINO cosine over pairs of images of the same prompt (no --lpips given; "
                                "not comparable with the paper's LPIPS-based DIV)"),
        "real_images": real_row,
        "counts": {"real": len(real), "prompts": len(per_prompt), "generated": sum(r["n"] for r in per_prompt),
                   "class": n_class},
        "per_prompt": per_prompt,
        "paper": dict(PAPER_ROWS),
    }


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(results: dict) -> str:
    """The headline numbers beside the paper's rows, as a plain-text table."""
    div_name = results["div_metric"]
    # With the fallback, the paper's LPIPS DIV keeps its own column: the two are different quantities.
    columns = ["DINO", "CLIP-I", "CLIP-T", "PRES", DIV_LPIPS] + ([div_name] if div_name != DIV_LPIPS else [])
    rows = [("this model", results["metrics"]), ("real images (this subject)", results["real_images"])] + PAPER_ROWS
    width = max(len(name) for name, _ in rows)
    lines = [f"{'':<{width}}  " + "  ".join(f"{c:>12}" for c in columns)]
    lines += [f"{name:<{width}}  " + "  ".join(f"{_cell(row.get(c)):>12}" for c in columns) for name, row in rows]
    if div_name != DIV_LPIPS:
        lines.append(f"note: {div_name} is 1 - DINO similarity (no --lpips given), not the paper's LPIPS-based DIV")
    return "\n".join(lines)


def write_results(results: dict, path: str | Path) -> Path:
    return atomic_write_json(path, results)


# ---- generation (through the project's sampler) ---------------------------------------------------------

def generate_eval_images(model_dir: str | Path, prompts: list[str], n_per_prompt: int, out_dir: str | Path, *,
                         backend: str = "torch", seed: int = 0, sr_model_dir: str | Path | None = None,
                         export_dir: str | Path | None = None, device: str = "auto", dtype: torch.dtype = torch.float32,
                         base_steps: int | None = None, sr_steps: int | None = None, batch_size: int = 8,
                         progress: bool = True) -> list[list[Path]]:
    """Generate `n_per_prompt` images for each prompt with the whole cascade (stage II when the model has one).

    Writes `out_dir/{prompt index:02d}/{image index:04d}.png` and returns those paths, per prompt. Image k of
    prompt i is drawn with its own CPU generator seeded `seed + i * n_per_prompt + k`, so it does not depend
    on `batch_size` (images per sampler call) or the device. Steps default to IF's (100 base, 50 SR), guidance
    to IF's. `backend` is any of `dbfast generate`'s; exported ones are read from `export_dir` (MODEL/export).
    """
    from ..export import default_export_dir
    from ..generate import TORCH_BACKENDS, unet_runner
    from ..images import save_png, to_pil
    from ..models import load_cascade, resolve_device
    from ..sample import BASE_STEPS, SR_STEPS, generate_cascade

    if n_per_prompt < 1:
        raise UserError(f"--n {n_per_prompt}: generate at least one image per prompt")
    dev = resolve_device(device)
    # Exported backends run their own copy of the UNets (as in `dbfast generate`): the torch ones are not loaded.
    cascade = load_cascade(model_dir, sr_model_dir, device=str(dev), dtype=dtype,
                           with_unets=backend in TORCH_BACKENDS)
    export_dir = Path(export_dir) if export_dir is not None else default_export_dir(model_dir)
    base_fn = unet_runner(backend, cascade.base_unet, cascade.base_dir, export_dir, "base", dev)
    sr_fn = unet_runner(backend, cascade.sr_unet, cascade.sr_dir, export_dir, "sr", dev) if cascade.sr_dir else None
    stages = ("base", "sr") if sr_fn is not None else ("base",)
    out_dir = Path(out_dir)
    jobs = [(i, k) for i in range(len(prompts)) for k in range(n_per_prompt)]
    written: list[list[Path]] = [[] for _ in prompts]
    for start in tqdm(range(0, len(jobs), batch_size), desc="generating", disable=not progress):
        batch = jobs[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed + i * n_per_prompt + k) for i, k in batch]
        images = generate_cascade(cascade, [prompts[i] for i, _ in batch], stages=stages, base_unet_fn=base_fn,
                                  sr_unet_fn=sr_fn, base_steps=base_steps or BASE_STEPS, sr_steps=sr_steps or SR_STEPS,
                                  generator=generators, progress=False)
        for (i, k), image in zip(batch, to_pil(images[stages[-1]])):
            (out_dir / f"{i:02d}").mkdir(parents=True, exist_ok=True)
            written[i].append(save_png(image, out_dir / f"{i:02d}" / f"{k:04d}.png"))
    return written


def subject_of(model_dir: str | Path) -> tuple[str | None, str | None]:
    """(identifier, class noun) recorded in a trained model's dreambooth.json, (None, None) where absent."""
    from ..rundir import read_run

    run = read_run(model_dir) or {}
    return run.get("identifier"), run.get("class_noun")


def generate_protocol(model_dir: str | Path, out_dir: str | Path, *, identifier: str, class_noun: str,
                      live: bool = False, n: int = 4, **generate_kwargs) -> Path:
    """Generate the 25 protocol prompts and the PRES prompt `a {class}` into `out_dir` with its manifest.

    The directory is built under a temporary name and swapped into place, so it is complete or absent.
    """
    from ..fileio import atomic_write_dir
    from .prompts import eval_prompts, pres_prompt

    prompts = eval_prompts(identifier, class_noun, live)
    clip_texts = eval_prompts("", class_noun, live)
    pres = pres_prompt(class_noun)

    def write(tmp: Path) -> None:
        paths = generate_eval_images(model_dir, prompts + [pres], n, tmp, **generate_kwargs)
        relative = [[p.relative_to(tmp).as_posix() for p in group] for group in paths]
        atomic_write_json(tmp / MANIFEST, {
            "format": MANIFEST_FORMAT,
            "model": str(model_dir), "identifier": identifier, "class_noun": class_noun, "live": live,
            "subject": [{"prompt": p, "clip_text": t, "images": r} for p, t, r in zip(prompts, clip_texts, relative)],
            "class": {"prompt": pres, "images": relative[-1]},
        })

    return atomic_write_dir(out_dir, write)


def run_eval(model: str | Path | None, real_images: str | Path, clip: str | Path, dino: str | Path, *,
             lpips: str | Path | None = None, live: bool = False, n: int = 4, generated: str | Path | None = None,
             out: str | Path | None = None, identifier: str | None = None, class_noun: str | None = None,
             device: str = "auto", progress: bool = True, **generate_kwargs) -> tuple[dict, Path]:
    """`dbfast eval`: generate the protocol's images unless `generated` is given, score them, write the results.

    Results go to `out` (default MODEL/eval.json, or GENERATED/eval.json); generated images to the results
    file's name without `.json` plus `-images` (MODEL/eval-images by default). Returns (results, results path).
    """
    from ..models import resolve_device

    if generated is None and model is None:
        raise UserError("give --model to generate the evaluation images, or --generated DIR to score existing ones")
    if generated is None:
        recorded_identifier, recorded_class = subject_of(model)
        identifier, class_noun = identifier or recorded_identifier, class_noun or recorded_class
        if not identifier or not class_noun:
            raise UserError(f"--model {model}: no dreambooth.json with the identifier and class noun; "
                            "pass --identifier and --class")
    # Check the inputs before loading anything, and load the encoders before minutes of generation.
    _check_model_dir(clip, "--clip")
    _check_model_dir(dino, "--dino")
    load_real_images(real_images)
    encoder_device = str(resolve_device(device))
    clip_encoder, dino_encoder = load_clip(clip, encoder_device), load_dino(dino, encoder_device)
    lpips_net = load_lpips(lpips, encoder_device) if lpips is not None else None
    out = Path(out) if out is not None else Path(generated if generated is not None else model) / "eval.json"
    if generated is None:
        generated = generate_protocol(model, out.with_name(out.stem + "-images"), identifier=identifier,
                                      class_noun=class_noun, live=live, n=n, device=device, progress=progress,
                                      **generate_kwargs)
    results = score_generated(generated, real_images, clip_encoder, dino_encoder, lpips_net, progress=progress)
    results["generated"] = str(generated)
    return results, write_results(results, out)
