"""The toy world and the small IF-layout cascades made in it: research code beside the product, not part of it.

One concern per module:
  world         the procedural captioned world (shapes, colours, backgrounds, named things, the example subject)
  judge         what a picture of the world shows, read from its pixels in closed form
  evaluation    `dbfast eval --toy`: a cascade sampled and judged (prompt fidelity, subject fidelity, PRES, DIV)
  pretrain      `python -m dreambooth_fast.toy.pretrain`: how the embedded default model is trained
  tiny_cascade  a tiny random cascade for tests, benchmarks and a checkout without the default model's weights
Nothing is imported here: the product imports a module of this package only where it needs it (lazily).
"""
