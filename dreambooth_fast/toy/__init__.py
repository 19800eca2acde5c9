"""The toy world and the small IF-layout cascades made in it: the paper's measured miniature, the training of the
embedded default model, the tiny random cascade of tests and benchmarks. Beside the product, not under it.

One concern per module:
  if_layout     DeepFloyd IF's diffusers layout, built once: scheduler, UNet and T5 configs, the SentencePiece
                trainer, the cascade writer (also used by the benchmarks, at IF's real sizes too)
  world         the procedural captioned world (shapes, colours, backgrounds, named things, the example subject)
  judge         what a picture of the world shows, read from its pixels in closed form
  evaluation    `dbfast eval --toy`: a cascade sampled and judged (prompt fidelity, subject fidelity, PRES, DIV)
  pretrain      `python -m dreambooth_fast.toy.pretrain`: how the embedded default model is trained
  tiny_cascade  a tiny random cascade for tests, benchmarks and a checkout without the default model's weights
  default_model the embedded default model: its path, that fallback, and what a run on it says to the user
Nothing is imported here. The product reaches in only for the default model (train, cli) and `dbfast eval --toy`.
"""
