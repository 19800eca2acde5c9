"""`dbfast eval`: the DreamBooth paper's evaluation of a trained model against the real subject photos.

- prompts.py: the paper's 25 evaluation prompts (objects, live subjects) and the PRES prompt.
- protocol.py: generating the protocol's images with their manifest, scoring a generated-images directory,
  `run_eval` (the command) and `format_table` (the results beside the paper's rows).
- metrics.py: DINO, CLIP-I, CLIP-T, PRES and DIV, as the paper defines them.
- encoders.py: the CLIP and DINO image encoders and LPIPS, loaded from local directories.

The real photos are read by `dreambooth_fast.data`, the same reader training uses.
"""

from .protocol import format_table, generate_eval_images, run_eval, score_generated

__all__ = ["format_table", "generate_eval_images", "run_eval", "score_generated"]
