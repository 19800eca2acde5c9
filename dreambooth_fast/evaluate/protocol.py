"""The DreamBooth evaluation protocol: generate 4 images for each of the 25 prompts (and the PRES prompt), write
them with a manifest, score them against the real photos, and show the numbers beside the paper's.

Metric code is separate from generation: `score_generated` reads a directory laid out as below, whoever made
it; `generate_eval_images` / `generate_protocol` make one from a cascade through the project's sampler.

Generated-images layout (what `--generated DIR` reads): `DIR/manifest.json`, format "dbfast-eval/1",

    {"format": "dbfast-eval/1",
     "subject": [{"prompt": "a sks dog in the jungle", "clip_text": "a dog in the jungle",
                  "images": ["00/0000.png", "00/0001.png", ...]}, ...],   # one entry per prompt
     "class": {"prompt": "a dog", "images": ["25/0000.png", ...]}}        # optional: PRES needs it

Image paths are relative to DIR (any layout works; `generate_protocol` writes `{prompt:02d}/{image:04d}.png`,
the class prompt last). Other keys (model, family, sampling, identifier, class_noun, live) are informational;
`family` (if or sd) marks the paper's DreamBooth row of that family in the table. `clip_text` is the
text CLIP-T compares the images with (default: the prompt); the protocol uses the prompt without the
identifier, which means nothing to CLIP's tokenizer.

The real photos are read by `dreambooth_fast.data`, exactly as `dbfast train` reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data import load_subject_images
from ..errors import UserError
from ..fileio import atomic_write_json
from .encoders import ClipEncoder, ImageEncoder, Lpips, check_model_dir, load_clip, load_dino, load_lpips
from .metrics import DIV_LPIPS, PAPER_DREAMBOOTH, PAPER_ROWS, score

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dbfast-eval/1"


# ---- scoring --------------------------------------------------------------------------------------------

def load_real_images(folder: str | Path) -> list[Image.Image]:
    """The real subject photos, read as `dbfast train` reads them, so that DINO and CLIP-I see the trained pixels."""
    return [photo.image for photo in load_subject_images(folder, option="--real-images")]


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
    return score(read_manifest(generated), load_real_images(real_images), clip, dino, lpips, progress=progress)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(results: dict) -> str:
    """The headline numbers beside the paper's rows, as a plain-text table."""
    div_name = results["div_metric"]
    # With the fallback, the paper's LPIPS DIV keeps its own column: the two are different quantities.
    columns = ["DINO", "CLIP-I", "CLIP-T", "PRES", DIV_LPIPS] + ([div_name] if div_name != DIV_LPIPS else [])
    # The paper's DreamBooth row of this model's family (Imagen for IF, Stable Diffusion) comes first, marked.
    family = PAPER_DREAMBOOTH.get(results.get("family"))
    paper = sorted(PAPER_ROWS, key=lambda row: row[0] != family)
    paper = [(f"{name} <- same family" if name == family else name, row) for name, row in paper]
    rows = [("this model", results["metrics"]), ("real images (this subject)", results["real_images"])] + paper
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
    on `batch_size` (images per sampler call) or the device. Steps and guidance default to the model family's
    pipeline (`sampling_settings`). `backend` is any of `dbfast generate`'s; exported ones are read from
    `export_dir` (MODEL/export).
    """
    from ..backends import TORCH_BACKENDS, unet_runner
    from ..export import default_export_dir
    from ..images import save_png, to_pil
    from ..models import load_cascade, resolve_device
    from ..sample import generate_cascade

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
    sampling = sampling_settings(cascade.family, base_steps, sr_steps)
    out_dir = Path(out_dir)
    jobs = [(i, k) for i in range(len(prompts)) for k in range(n_per_prompt)]
    written: list[list[Path]] = [[] for _ in prompts]
    for start in tqdm(range(0, len(jobs), batch_size), desc="generating", disable=not progress):
        batch = jobs[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed + i * n_per_prompt + k) for i, k in batch]
        images = generate_cascade(cascade, [prompts[i] for i, _ in batch], stages=stages, base_unet_fn=base_fn,
                                  sr_unet_fn=sr_fn, generator=generators, progress=False, **sampling)
        for (i, k), image in zip(batch, to_pil(images[stages[-1]])):
            (out_dir / f"{i:02d}").mkdir(parents=True, exist_ok=True)
            written[i].append(save_png(image, out_dir / f"{i:02d}" / f"{k:04d}.png"))
    return written


def sampling_settings(family: str, base_steps: int | None = None, sr_steps: int | None = None) -> dict:
    """The steps and guidance the protocol draws with: the model family's own pipeline defaults where not given.
    DeepFloyd IF: 100 base steps at guidance 7, 50 SR steps at 4 (IFPipeline, IFSuperResolutionPipeline); Stable
    Diffusion: StableDiffusionPipeline's 50 steps of the model's scheduler at guidance 7.5, its x4 upscaler at 9
    (StableDiffusionUpscalePipeline); SDXL: StableDiffusionXLPipeline's 50 steps at guidance 5."""
    from ..sample import BASE_GUIDANCE, BASE_STEPS, SR_GUIDANCE, SR_STEPS
    from ..sd import PIPELINE_GUIDANCE, PIPELINE_STEPS, SDXL_PIPELINE_GUIDANCE
    from ..sd_upscale import GUIDANCE as UPSCALE_GUIDANCE

    latent = family in ("sd", "sdxl")
    base_guidance = {"sd": PIPELINE_GUIDANCE, "sdxl": SDXL_PIPELINE_GUIDANCE}.get(family, BASE_GUIDANCE)
    return {"base_steps": base_steps or (PIPELINE_STEPS if latent else BASE_STEPS),
            "base_guidance": base_guidance,
            "sr_steps": sr_steps or SR_STEPS, "sr_guidance": UPSCALE_GUIDANCE if family == "sd" else SR_GUIDANCE}


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
    from ..models import model_family
    from .prompts import eval_prompts, pres_prompt

    prompts = eval_prompts(identifier, class_noun, live)
    clip_texts = eval_prompts("", class_noun, live)
    pres = pres_prompt(class_noun)
    family = model_family(Path(model_dir))
    sampling = sampling_settings(family, generate_kwargs.get("base_steps"), generate_kwargs.get("sr_steps"))

    def write(tmp: Path) -> None:
        paths = generate_eval_images(model_dir, prompts + [pres], n, tmp, **generate_kwargs)
        relative = [[p.relative_to(tmp).as_posix() for p in group] for group in paths]
        atomic_write_json(tmp / MANIFEST, {
            "format": MANIFEST_FORMAT,
            "model": str(model_dir), "family": family, "sampling": sampling, "identifier": identifier,
            "class_noun": class_noun, "live": live,
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
    check_model_dir(clip, "--clip")
    check_model_dir(dino, "--dino")
    real = load_real_images(real_images)
    encoder_device = str(resolve_device(device))
    clip_encoder, dino_encoder = load_clip(clip, encoder_device), load_dino(dino, encoder_device)
    lpips_net = load_lpips(lpips, encoder_device) if lpips is not None else None
    out = Path(out) if out is not None else Path(generated if generated is not None else model) / "eval.json"
    if generated is None:
        generated = generate_protocol(model, out.with_name(out.stem + "-images"), identifier=identifier,
                                      class_noun=class_noun, live=live, n=n, device=device, progress=progress,
                                      **generate_kwargs)
    manifest = read_manifest(generated)
    results = score(manifest, real, clip_encoder, dino_encoder, lpips_net, progress=progress)
    results["generated"] = str(generated)
    results["family"] = manifest.get("family")  # which paper row is this model's (format_table)
    results["sampling"] = manifest.get("sampling")
    return results, write_results(results, out)
