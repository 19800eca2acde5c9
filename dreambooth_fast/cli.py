"""The `dbfast` command line. Commands are thin: they parse options and call the module that does the work."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from . import __version__
from .backends import BACKENDS
from .config import LR_SCHEDULES, PRECISIONS, PRIOR_MODES, REPORT_TO, TrainConfig
from .distributed import error_stream, rank_prefix
from .errors import ReportedByRank0, UserError
from .samplers import SAMPLERS


class _Group(click.Group):
    """Turns a UserError into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        # Library warnings (a small photo, a truncated prompt) print as one line each, not with file:line.
        warnings.showwarning = lambda message, *args, **kwargs: click.echo(f"warning: {message}", err=True)
        try:
            return super().invoke(ctx)
        except ReportedByRank0:
            sys.exit(ReportedByRank0.exit_code)
        except UserError as err:
            click.echo(f"error: {rank_prefix()}{err}", file=error_stream())
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dbfast")
def main() -> None:
    """Fast DreamBooth for cascaded text-to-image diffusion models (DeepFloyd IF layout; Stable Diffusion 1.x/2.x
    with its x4 upscaler too).

    \b
    Typical use:
      dbfast train --images photos/ --class dog --output runs/my-dog
      dbfast generate "a [V] dog on the beach" --model runs/my-dog
    """


@main.command()
def doctor() -> None:
    """Print the environment: torch and device, native ops built per device, optional backends, free disk."""
    from .doctor import report

    click.echo(report())


def default(field: str) -> str:
    """'  [default: X]' for a help text, X read from TrainConfig: the defaults are written once."""
    value = getattr(TrainConfig(), field)
    return f"  [default: {','.join(value) if isinstance(value, tuple) else value}]"


def _without_option(args: list[str], name: str) -> list[str]:
    """`args` without `name VALUE` / `name=VALUE` (the command line each started process gets)."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(f"{name}="):
            kept.append(arg)
    return kept


def _stages(value: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in value.split(",") if s.strip())


@main.command()
@click.option("--images", type=click.Path(), help="Directory of 3-5 photos of the subject (jpg, png, webp).")
@click.option("--class", "class_noun", help="The subject's class noun, e.g. dog: prompts are 'a [V] dog' and 'a dog'.")
@click.option("--model", type=click.Path(),
              help="Cascade directory in DeepFloyd IF's diffusers layout (stage I, optional stage_2/), or a "
                   "Stable Diffusion 1.x/2.x directory (StableDiffusionPipeline layout, optional stage_2/ with the x4 "
                   "upscaler). [default: the embedded toy model, else a tiny random cascade]")
@click.option("--sr-model", type=click.Path(),
              help="SR stage directory when it is not MODEL/stage_2: IF stage II (e.g. IF-II-L-v1.0), or for a "
                   "Stable Diffusion model the x4 upscaler (StableDiffusionUpscalePipeline, e.g. "
                   "stable-diffusion-x4-upscaler).")
@click.option("--output", type=click.Path(),
              help="Output directory: the tuned cascade plus dreambooth.json." + default("output"))
@click.option("--config", "config_file", type=click.Path(),
              help="TOML file of these options (keys as the long option names).")
@click.option("--stages", help="Stages to train, comma separated: base, sr; each must be there (sr: stage_2/ or "
                               "--sr-model).  [default: every stage the model has]")
@click.option("--identifier", help="Use this identifier instead of searching the vocabulary for rare tokens.")
@click.option("--identifier-tokens", type=int,
              help="Rare tokens in the identifier, 1-3 (the paper's k)." + default("identifier_tokens"))
@click.option("--captions", is_flag=True, default=None,
              help="Caption each photo from NAME.txt beside it, [V] marking the identifier (e.g. 'a [V] dog on a "
                   "sofa'), instead of 'a [V] [class]' for all: what the caption names is not bound to [V].")
@click.option("--prior/--no-prior", "prior_preservation", default=None,
              help="Class-specific prior preservation loss (the paper's method).  [default: on]")
@click.option("--prior-weight", type=float,
              help="lambda, the prior loss weight (the paper: 1)." + default("prior_weight"))
@click.option("--prior-mode", type=click.Choice(PRIOR_MODES),
              help="What the prior rows are: 'images', the paper's class images drawn by the frozen model before "
                   "training; or 'predictions', no class images: each step the frozen model's own prediction for "
                   "'a [class]' on the subject rows' noisy input is the prior target (LoRA: the UNet with its "
                   "adapter off; full fine-tuning: a frozen copy of the UNet, one more set of weights in memory)."
                   + default("prior_mode"))
@click.option("--num-class-images", type=int,
              help="Class images to generate (paper ~1000; diffusers 100, recommends 200-300)."
                   + default("num_class_images"))
@click.option("--class-images-dir", type=click.Path(), help="Use these class images instead of generating them.")
@click.option("--class-sampler", type=click.Choice(SAMPLERS),
              help="Sampler of the class images (both stages): ddpm (the model's own scheduler, IF's default), "
                   "dpm++ (DPM-Solver++, 2nd order multistep), or one of IF's fixed timestep presets (fast27, "
                   "smart27, ...; they ignore the step counts)." + default("class_sampler"))
@click.option("--class-batch-size", type=int,
              help="Class images per sampler call (halved by itself where a batch does not fit in memory); the "
                   "images do not depend on it." + default("class_batch_size"))
@click.option("--class-backend", type=click.Choice(BACKENDS),
              help="UNet backend of the frozen model drawing the class images: eager torch, torch.compile, or an "
                   "export of the input model (onnx, trt: run `dbfast export --model MODEL --onnx|--trt` first)."
                   + default("class_backend"))
@click.option("--class-export-dir", type=click.Path(),
              help="Where the input model's exports are, for --class-backend onnx|trt  [default: MODEL/export].")
@click.option("--class-sample-steps", type=int,
              help="Stage I sampling steps per class image." + default("class_sample_steps"))
@click.option("--class-guidance-scale", type=float,
              help="Guidance scale of the class images; lower draws a more varied class."
                   + default("class_guidance_scale"))
@click.option("--sr-sample-steps", type=int,
              help="Stage II sampling steps per class image." + default("sr_sample_steps"))
@click.option("--steps", type=int, help="Optimizer steps per stage (paper ~1000)." + default("steps"))
@click.option("--sr-steps", type=int, help="Optimizer steps for the SR stage.  [default: --steps]")
@click.option("--learning-rate", "--lr", type=float,
              help="Adam learning rate (paper, Imagen: 1e-5)." + default("learning_rate"))
@click.option("--lr-warmup-steps", type=int,
              help="Linear warm-up steps before the schedule." + default("lr_warmup_steps"))
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES),
              help="After warm-up: constant (diffusers' DreamBooth default), or decaying towards 0 at the last"
                   " step, linearly or along a half cosine." + default("lr_schedule"))
@click.option("--batch-size", type=int, help="Subject rows per step (plus as many prior rows)." + default("batch_size"))
@click.option("--gradient-accumulation", type=int,
              help="Micro-batches per optimizer step." + default("gradient_accumulation"))
@click.option("--max-grad-norm", type=float, help="Gradient clipping norm." + default("max_grad_norm"))
@click.option("--precision", type=click.Choice(PRECISIONS),
              help="Autocast precision; fp16 uses loss scaling." + default("precision"))
@click.option("--gradient-checkpointing", is_flag=True, default=None, help="Trade compute for activation memory.")
@click.option("--compile/--no-compile", "compile", default=None,
              help="torch.compile the UNet (Inductor; the first steps take longer); if compiling fails, one line "
                   "says so and training goes on eagerly." + default("compile"))
@click.option("--fused-norm/--no-fused-norm", "fused_norm", default=None,
              help="Run each ResNet block's GroupNorm -> scale-shift -> GELU/SiLU chain as one fused op "
                   "(same results, fewer passes over memory)." + default("fused_norm"))
@click.option("--min-snr-gamma", type=float, help="Min-SNR-gamma loss weighting of the subject rows (e.g. 5).")
@click.option("--lora-rank", type=int,
              help="Train a LoRA adapter of this rank instead of the whole UNet." + default("lora_rank"))
@click.option("--merge", "merge_lora", is_flag=True, default=None,
              help="With --lora-rank: write merged weights, not the adapter.")
@click.option("--train-text-encoder", is_flag=True, default=None,
              help="Stable Diffusion: train the CLIP text encoder together with the UNet, as diffusers' "
                   "train_dreambooth.py offers (the prompts are encoded inside each step); with --lora-rank a LoRA on "
                   "its attention projections, saved in the same pytorch_lora_weights.safetensors. Off by default "
                   "(the paper tunes the UNets alone); not for DeepFloyd IF (T5-XXL) nor a run over several "
                   "processes.")
@click.option("--text-encoder-lr", type=float,
              help="Adam learning rate of the text encoder with --train-text-encoder.  [default: --learning-rate]")
@click.option("--use-8bit-adam", is_flag=True, default=None, help="8-bit Adam (bitsandbytes, an optional extra).")
@click.option("--sr-noise-level", type=int,
              help="SR conditioning noise augmentation, IF's 0-999 scale (paper: lowered to 1e-5 -> 0); for the x4 "
                   "upscaler its own noise_level, 0 to max_noise_level (350; its pipeline samples at 20)."
                   + default("sr_noise_level"))
@click.option("--flip", is_flag=True, default=None, help="Add horizontally flipped copies of the subject photos.")
@click.option("--skip-bad-images", is_flag=True, default=None,
              help="Skip unreadable photos (with a warning) instead of stopping.")
@click.option("--checkpoint-every", type=int, help="Steps between checkpoints." + default("checkpoint_every"))
@click.option("--validation-prompt", help="Prompt for validation grids ('[V]' is replaced by the identifier).")
@click.option("--validation-every", type=int,
              help="Steps between validation grids (0: never)." + default("validation_every"))
@click.option("--report-to", type=click.Choice(REPORT_TO),
              help="Also write the metrics of OUTPUT/logs/metrics.csv as TensorBoard event files in "
                   "OUTPUT/logs/tensorboard (needs the tensorboard extra)." + default("report_to"))
@click.option("--seed", type=int, help="Seed of everything random in the run." + default("seed"))
@click.option("--device", help="auto, cpu, cuda or cuda:N." + default("device"))
@click.option("--fsdp", is_flag=True, default=None,
              help="Under torchrun/accelerate launch: shard the UNet, its gradients and Adam's state over the "
                   "processes (FSDP2) instead of a copy on each (DDP, the default): for a UNet too big for one device.")
@click.option("--dist-timeout", type=int,
              help="Under torchrun: seconds a process waits for the others in one exchange before it stops the run."
                   + default("dist_timeout"))
@click.option("--nproc-per-node", type=click.IntRange(1),
              help="Start this many processes on this machine (one per GPU) and run as one distributed run, or as a "
                   "queue with --subjects: what torchrun --standalone --nproc_per_node N starts, without torchrun's "
                   "report on failure (the exit code is the first failed process's).")
@click.option("--resume", is_flag=True,
              help="Continue the run in --output from its last checkpoint. With --subjects: a finished subject is "
                   "reported 'done (already)', an unfinished one continues, one without an output starts.")
@click.option("--overwrite", is_flag=True,
              help="Replace the run already in --output (with --subjects: every subject's run starts again).")
@click.option("--subjects", "subjects_file", type=click.Path(),
              help="Train many subjects: a TOML file of [[subject]] tables (images, class, output, any option "
                   "above), shared options at its top; relative paths in it are relative to its folder. Options "
                   "given here are defaults under the file's. Under torchrun the subjects are a queue over the "
                   "ranks, one per rank at a time. Exit code 3 when some subjects failed (the others go on).")
@click.option("--summary", type=click.Path(),
              help="With --subjects: where the summary table is written as JSON  [default: NAME-summary.json "
                   "beside the subjects file NAME.toml].")
def train(config_file: str | None, subjects_file: str | None, summary: str | None, nproc_per_node: int | None,
          resume: bool, overwrite: bool, **options) -> None:
    """Fine-tune a cascade on a subject with DreamBooth: bind a rare-token identifier to the subject with the
    class-specific prior preservation loss, stage by stage (base, then super-resolution).

    \b
    Many subjects (README, "Many subjects"):
      dbfast train --subjects subjects.toml
      torchrun --nproc_per_node 2 -m dreambooth_fast train --subjects subjects.toml
    """
    from .config import load_toml
    from .distributed import (
        init_from_env,
        launch_here,
        launched_world_size,
        process_device,
        quiet_unless_main,
        reported_once,
        shutdown,
    )
    from .models import resolve_device
    from .rundir import read_run
    from .text_training import check_processes
    from .toy.default_model import DEFAULT_MODEL
    from .toy.world import SHAPES
    from .train import train as run_training

    if nproc_per_node and nproc_per_node > 1:
        if launched_world_size() > 1:
            raise reported_once(UserError("--nproc-per-node: this process was already started by a launcher "
                                          "(torchrun, accelerate launch): pass one or the other"))
        sys.exit(launch_here(nproc_per_node, _without_option(sys.argv[1:], "--nproc-per-node")))
    try:
        values = load_toml(config_file) if config_file else {}
        if options.get("stages") is not None:
            options["stages"] = _stages(options["stages"])
        values.update({k: v for k, v in options.items() if v is not None})
    except UserError as err:
        raise reported_once(err) from None
    if subjects_file:  # every rank prints its own subjects' lines (subjects.py prefixes them)
        from .subjects import train_subjects

        sys.exit(train_subjects(subjects_file, values, resume=resume, overwrite=overwrite, summary=summary))
    # Under torchrun / accelerate launch: only rank 0 prints (and writes); the processes join once the options
    # are found good (every rank would find the same mistake: rank 0 says it).
    quiet_unless_main()
    try:
        if summary:
            raise UserError("--summary is the summary of --subjects: pass both, or neither")
        cfg = TrainConfig(**values)
        device = process_device(resolve_device(cfg.validate().device))
        check_processes(cfg, launched_world_size())
    except UserError as err:
        raise reported_once(err) from None
    dist = init_from_env(device, cfg.dist_timeout)
    try:
        out = run_training(cfg, resume=resume, overwrite=overwrite, dist=dist)
    finally:
        shutdown()
    timings = (read_run(out) or {}).get("timings") or {}
    rank = {"load": 0, "class_images": 1, "write": 3, "pictures": 4}  # the stages' train_* come between
    click.echo("time: " + ", ".join(f"{phase.replace('_', ' ')} {timings[phase]:.1f} s"
                                    for phase in sorted(timings, key=lambda p: (rank.get(p, 2), p)))
               + f" (sum {sum(timings.values()):.1f} s)")
    noun = cfg.class_noun
    if Path(cfg.model).resolve() != DEFAULT_MODEL.resolve():
        click.echo(f'done: {out}  (try: dbfast generate "a [V] {noun} on the beach" --model {out})')
    elif noun.strip().lower() in SHAPES:  # the toy world draws this shape, on its own backgrounds
        click.echo(f'done: {out}  (try: dbfast generate "a [V] {noun} on a red background" --model {out})')
    else:
        click.echo(f"done: {out}  (the embedded toy model draws coloured shapes, not a {noun}: for real photos "
                   "train a real cascade with --model; see README, 'With the real DeepFloyd IF')")


@main.command()
@click.argument("prompt")
@click.option("--model", type=click.Path(), required=True, help="A cascade directory, e.g. the output of dbfast train.")
@click.option("--sr-model", type=click.Path(),
              help="SR stage directory when it is not MODEL/stage_2: IF stage II, or for a Stable Diffusion model "
                   "the x4 upscaler (StableDiffusionUpscalePipeline).")
@click.option("-n", "--num-images", default=4, show_default=True, type=click.IntRange(1), help="Images to generate.")
@click.option("--stages", help="Stop after the base stage with --stages base.  [default: base,sr; Stable Diffusion "
                               "without an x4 upscaler: base]")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(1),
              help="Stage I sampling steps (IF: 100).")
@click.option("--sr-steps", default=25, show_default=True, type=click.IntRange(1),
              help="Stage II sampling steps (IF: 50).")
@click.option("--sampler", default="ddpm", show_default=True, type=click.Choice(SAMPLERS),
              help="ddpm (the model's own scheduler), dpm++ (DPM-Solver++, good in fewer steps), or one of IF's "
                   "timestep presets (fast27, smart27, ...; they ignore --steps and --sr-steps).")
@click.option("--guidance", default=7.0, show_default=True, help="Stage I classifier-free guidance scale.")
@click.option("--sr-guidance", type=float,
              help="Stage II classifier-free guidance scale.  [default: 4 (IF), 9 (the x4 upscaler's pipeline)]")
@click.option("--noise-level", type=click.IntRange(0, 999),
              help="Stage II noise augmentation of the low-res image: IF's 0-999, the x4 upscaler's 0 to its "
                   "max_noise_level (350).  [default: 250 (IF), 20 (the x4 upscaler's pipeline)]")
@click.option("--seed", default=0, show_default=True, help="Seed; image k uses its own generator seeded seed + k.")
@click.option("--backend", default="torch", show_default=True, type=click.Choice(BACKENDS),
              help="UNet backend: eager torch, torch.compile, ONNX Runtime or TensorRT (after dbfast export).")
@click.option("--export-dir", type=click.Path(),
              help="Where dbfast export wrote ONNX/TensorRT files [default: MODEL/export].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--out", type=click.Path(), help="Output directory for the PNGs and grid.png  [default: MODEL/samples].")
def generate(prompt: str, model: str, sr_model: str | None, num_images: int, stages: str | None, steps: int,
             sr_steps: int, sampler: str, guidance: float, sr_guidance: float | None, noise_level: int | None,
             seed: int, backend: str,
             export_dir: str | None, device: str, out: str | None) -> None:
    """Generate images for PROMPT through the cascade; a literal [V] in PROMPT becomes the model's identifier."""
    from .generate import generate_images

    paths = generate_images(prompt, model, sr_model=sr_model, n=num_images,
                            stages=_stages(stages) if stages is not None else None, steps=steps,
                            sr_steps=sr_steps, sampler=sampler, guidance=guidance, sr_guidance=sr_guidance,
                            noise_level=noise_level, seed=seed, backend=backend, export_dir=export_dir, device=device,
                            out=out)
    click.echo(f"wrote {len(paths) - 1} images and {paths[-1]}")


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(),
              help="Model directory (DeepFloyd IF stage I or Stable Diffusion layout) whose tokenizer/ to search.")
@click.option("--n", "n_tokens", default=1, show_default=True, type=click.IntRange(1, 3),
              help="How many rare tokens to concatenate into the identifier (the paper: 1-3).")
@click.option("--seed", default=0, show_default=True, help="Seed of the uniform sampling of rare token ids.")
@click.option("--limit", default=20, show_default=True, help="How many candidates to list (0: all).")
@click.option("--check", "check_word", metavar="WORD", help="Check this identifier instead of choosing one.")
def identifier(model_dir: str, n_tokens: int, seed: int, limit: int, check_word: str | None) -> None:
    """List the rare-token identifier candidates of a model's tokenizer and why each was kept, and the chosen
    one; or, with --check, say whether WORD tokenises as an identifier should."""
    from pathlib import Path

    from .identifier import candidates_report, check_identifier, choose_identifier, describe
    from .models import check_stage_dir, load_tokenizer

    check_stage_dir(Path(model_dir), "base")
    tokenizer = load_tokenizer(model_dir)
    if check_word is not None:
        for warning in check_identifier(tokenizer, check_word):
            click.echo(f"warning: {warning}", err=True)
        click.echo(describe(tokenizer, check_word))
        return
    click.echo(candidates_report(tokenizer, seed=seed, limit=limit))
    click.echo(f"chosen: {choose_identifier(tokenizer, n_tokens=n_tokens, seed=seed)}")


@main.command(name="eval")
@click.option("--model", type=click.Path(), help="Trained output (cascade dir with dreambooth.json) to generate from.")
@click.option("--sr-model", type=click.Path(),
              help="SR stage directory (IF stage II, or Stable Diffusion's x4 upscaler), when not in MODEL/stage_2.")
@click.option("--toy", is_flag=True,
              help="Judge a toy-world model exactly (held-out prompt and named-thing fidelity, stage II fidelity; "
                   "for a DreamBooth run also subject fidelity, PRES, DIV); needs no encoders.")
@click.option("--real-images", type=click.Path(), help="Directory of the real subject photos.")
@click.option("--clip", "clip_dir", type=click.Path(),
              help="Local CLIPModel directory (config, weights, tokenizer, preprocessor_config.json).")
@click.option("--dino", "dino_dir", type=click.Path(),
              help="Local DINO ViT directory, e.g. facebook/dino-vits16 saved with its image processor.")
@click.option("--lpips", "lpips_dir", type=click.Path(),
              help="Directory with alexnet.pth|.safetensors (torchvision AlexNet) and lpips_alex.pth|.safetensors "
                   "(lpips v0.1 alex.pth) for DIV; without it DIV is reported as 'DIV (1-DINO)'.")
@click.option("--live", is_flag=True, help="Use the live-subject prompts (pets) instead of the object prompts.")
@click.option("--n", default=4, show_default=True, type=click.IntRange(1), help="Images per prompt.")
@click.option("--generated", type=click.Path(),
              help="Score this directory of already generated images (its manifest.json) instead of generating.")
@click.option("--out", type=click.Path(), help="Results JSON [default: MODEL/eval.json or GENERATED/eval.json].")
@click.option("--identifier", help="The subject's identifier [default: from MODEL/dreambooth.json].")
@click.option("--class", "class_noun", help="The subject's class noun [default: from MODEL/dreambooth.json].")
@click.option("--backend", default="torch", show_default=True, type=click.Choice(BACKENDS),
              help="UNet backend for generation, as in dbfast generate.")
@click.option("--export-dir", type=click.Path(), help="Exports for onnx/trt [default: MODEL/export].")
@click.option("--steps", type=click.IntRange(1),
              help="Stage I sampling steps [default: the model's pipeline: IF's 100 at guidance 7, Stable "
                   "Diffusion's 50 at guidance 7.5].")
@click.option("--sr-steps", type=click.IntRange(1), help="Stage II sampling steps [default: IF's 50].")
@click.option("--seed", default=0, show_default=True, help="Image k of prompt i uses seed + i*n + k.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1), help="Images per sampler call.")
@click.option("--device", default="auto", show_default=True, help="Device for generation and the encoders.")
def eval_(model, sr_model, toy, real_images, clip_dir, dino_dir, lpips_dir, live, n, generated, out, identifier,
          class_noun, backend, export_dir, steps, sr_steps, seed, batch_size, device) -> None:
    """Measure a model the DreamBooth paper's way: DINO, CLIP-I, CLIP-T, PRES and DIV over 4 images for each of
    the 25 protocol prompts, printed beside the paper's rows and written as JSON. With --toy: the toy world's
    exact judge instead (see QUALITY.md)."""
    if toy:
        from .toy.default_model import default_model_dir
        from .toy.evaluation import STEPS, evaluate, format_results

        results, path = evaluate(model or default_model_dir(), n=n, seed=seed, steps=steps or STEPS, out=out)
        click.echo(format_results(results))
        click.echo(f"results: {path}")
        return
    missing = [o for o, v in (("--real-images", real_images), ("--clip", clip_dir), ("--dino", dino_dir)) if not v]
    if missing:
        raise UserError(f"{', '.join(missing)} required (or pass --toy for a toy-world model)")
    from .evaluate import format_table, run_eval

    generate = {} if generated else dict(backend=backend, sr_model_dir=sr_model, export_dir=export_dir,
                                         base_steps=steps, sr_steps=sr_steps, seed=seed, batch_size=batch_size)
    results, path = run_eval(model, real_images, clip_dir, dino_dir, lpips=lpips_dir, live=live, n=n,
                             generated=generated, out=out, identifier=identifier, class_noun=class_noun,
                             device=device, **generate)
    click.echo(format_table(results))
    click.echo(f"results: {path}")


@main.command(name="export")
@click.option("--model", required=True, type=click.Path(), help="Cascade directory, e.g. the output of dbfast train.")
@click.option("--sr-model", type=click.Path(),
              help="SR stage directory when it is not MODEL/stage_2 (IF stage II, or Stable Diffusion's x4 upscaler: "
                   "ONNX only, its TensorRT engine is not built yet).")
@click.option("--onnx", "to_onnx", is_flag=True, help="Export fp32 ONNX graphs (for --backend onnx; no GPU needed).")
@click.option("--trt", "to_trt", is_flag=True, help="Build TensorRT engines (NVIDIA GPU and TensorRT 10 or later).")
@click.option("--out", type=click.Path(), help="Output folder  [default: MODEL/export].")
@click.option("--precision", type=click.Choice(["fp16", "fp32"]),
              help="Engine precision; with --onnx, also an ONNX graph in it.  [default: fp16]")
@click.option("--batch-sizes", help="Prompt batch MIN:OPT:MAX the engines serve; the UNet batch is twice that "
                                    "(classifier-free guidance).  [default: 1:4:8]")
@click.option("--opset", type=int, help="ONNX opset, 18 or later.  [default: 18]")
@click.option("--refit", is_flag=True, default=None,
              help="Build refittable engines, and refit them instead of rebuilding when only the weights changed.")
@click.option("--preset", type=click.Path(), help="JSON file of these options (export/presets/); given options win.")
def export_(model: str, sr_model: str | None, to_onnx: bool, to_trt: bool, out: str | None, preset: str | None,
            **options) -> None:
    """Export the cascade's UNets to ONNX (each checked against PyTorch) and to TensorRT engines, for
    dbfast generate --backend onnx|trt. What is already exported from the same weights is kept."""
    from .export import default_export_dir, export_cascade, load_preset

    values = load_preset(preset) if preset else {}
    values.update({k: v for k, v in options.items() if v is not None})
    export_cascade(model, sr_model_dir=sr_model, out_dir=out, onnx=to_onnx, trt=to_trt, log=click.echo, **values)
    click.echo(f"done: {out or default_export_dir(model)}")
