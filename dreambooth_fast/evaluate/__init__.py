"""`dbfast eval`: the DreamBooth paper's evaluation (prompts, generated images, DINO/CLIP-I/CLIP-T/PRES/DIV)."""

from .protocol import format_table, generate_eval_images, run_eval, score_generated

__all__ = ["format_table", "generate_eval_images", "run_eval", "score_generated"]
