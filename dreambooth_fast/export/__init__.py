"""Export of the cascade's UNets to ONNX and TensorRT, and the runners that generate with them.

One concern per module:
  profiles        --batch-sizes MIN:OPT:MAX, the guidance doubling, preset files
  onnx_export     stage discovery, UNet loading, the ONNX graph interface and export
  parity          exported graph or engine vs PyTorch: max abs error and cosine, with tolerances
  manifest        manifests, weights hashes, engine cache key, staleness rules (pure Python)
  tensorrt_build  the thin TensorRT layer: import, environment, build, refit
  runners         UNet runners over exports (onnx, trt) and make_unet_runner
  cascade         `dbfast export`: all of the above for every stage of a cascade
Non-code companions (profile presets and their README) live in the repository's top-level export/ folder.
"""

from .cascade import default_export_dir, export_cascade
from .profiles import load_preset, parse_batch_sizes
from .runners import EXPORT_BACKENDS, make_unet_runner

__all__ = ["EXPORT_BACKENDS", "default_export_dir", "export_cascade", "load_preset", "make_unet_runner",
           "parse_batch_sizes"]
