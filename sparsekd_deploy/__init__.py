"""sparsekd-deploy: staged Sparse Knowledge Distillation and deployment to edge runtimes.

Importing the package is cheap and never touches CUDA, TensorRT or onnxruntime-gpu: heavy back ends are
imported inside the plug-in that needs them.
"""

__version__ = "0.1.0"
