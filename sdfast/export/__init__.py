"""Build time: torch modules → ONNX → TensorRT plans, each artifact dir sealed by a manifest.

Every exporter writes into a temporary folder next to the target and renames it into place
only after ``manifest.json`` (written last) lists every file with its hash, so an interrupted
export never leaves a folder that loads.
"""
