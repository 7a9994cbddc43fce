"""Imaging: untrusted bytes to canonical images (safe decoding and normalisation in a sandboxed
process pool), the image features and hashes computed once per image, and the eval-time
preprocessing shared by training and the ONNX runtime."""
