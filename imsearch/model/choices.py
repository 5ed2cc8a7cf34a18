"""The names a model is chosen by: devices, precisions, runtimes, preprocessings. A light module (tuples of strings,
no imports) so that the command line's choice lists come from the library without `imsearch --help` importing
numpy, PIL or torch; embed, runtimes and pixels check their arguments against the same tuples."""

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
ONNX_PRECISIONS = ("auto", "fp32", "int8")  # the precisions ONNX Runtime runs
BACKENDS = ("auto", "torch", "onnx")
PREPROCESSINGS = ("recipe", "square224", "seed1028x768")  # pixels.PREPROCESSING's keys, in its order
