"""Serving: the champion as ONNX runtimes and the torch-free predictor behind ``cvops predict``.

One concern per module, from the file format outwards:

- ``runtime_file``: the runtime file format (tensor names, ``metadata_props``, integrity seal,
  external-data checks, the defensive loader);
- ``predictor``: ONNX Runtime session settings, image file reading, :class:`Predictor`;
- ``file_predictions``: files and folders named on the command line, one outcome per path;
- ``export``: torch model -> ONNX runtime file, and parity with PyTorch;
- ``quantization``: the INT8 variant and its keep/reject gate;
- ``pointer``: ``production/serving.json``, the runtime being served, pinned by SHA-256 and
  cross-checked against the production history;
- ``build``: a model -> content-addressed runtime candidates, parity and the INT8 gate (publishes nothing);
- ``publication``: a gate decision -> runtime reused or built -> history event -> pointers
  (the ``onnx_runtime`` asset's one call).

Importing any module of this package loads neither torch nor Lightning (a test enforces it):
``export`` and ``build`` import torch inside the functions that build a runtime.
"""
