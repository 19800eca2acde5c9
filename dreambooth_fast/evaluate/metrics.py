"""The DreamBooth paper's metrics (DINO, CLIP-I, CLIP-T, PRES, DIV) of generated images against the real photos.

Definitions (embeddings are L2-normalised, similarity is cosine):
- DINO: mean over all (generated, real) pairs of the similarity of DINO ViT CLS embeddings
  (`last_hidden_state[:, 0]`, after the final layer norm, as DINO's own forward returns it).
- CLIP-I: the same with CLIP image embeddings (projected, `get_image_features`).
- CLIP-T: mean over generated images of the similarity between the image and its prompt's CLIP text embedding.
- PRES: DINO similarity between the real images and the images generated for `a {class}` (lower = less drift).
- DIV: per prompt, mean LPIPS distance over unordered pairs of its images, then the mean over prompts (higher =
  more diverse). Without LPIPS weights DIV falls back to 1 - DINO similarity of the same pairs, and the metric
  is reported as "DIV (1-DINO)": a different quantity, not comparable to the paper.
- Real images row: the same DINO and CLIP-I over unordered pairs of distinct real images (the ceiling).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..data import read_image
from ..errors import UserError
from .encoders import ClipEncoder, ImageEncoder, Lpips, to_tensor

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
# The paper's DreamBooth row of each model family: IF is the public model of Imagen's shape.
PAPER_DREAMBOOTH = {"if": "paper: DreamBooth (Imagen)", "sd": "paper: DreamBooth (Stable Diffusion)"}


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

def score(manifest: dict, real: list[Image.Image], clip: ClipEncoder, dino: ImageEncoder, lpips: Lpips | None = None,
          progress: bool = False) -> dict:
    """Score the images a manifest lists (as `protocol.read_manifest` returns it: image paths absolute) against
    the real subject photos `real`; the results as a JSON-able dict. DIV uses `lpips` when given, else the
    fallback."""
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
