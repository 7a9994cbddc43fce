"""Serving: the champion as ONNX runtimes (export, parity, INT8 variant), the serving pointer, and
the torch-free predictor behind ``cvops predict``. Importing any module of this package loads
neither torch nor Lightning (a test enforces it): the export and build functions import torch
inside their bodies, where a runtime is built."""
