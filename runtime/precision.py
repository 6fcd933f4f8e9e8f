"""float32 on CUDA as IEEE float32: TensorFloat-32 off for convolutions and matrix products unless a run allows it.

torch 2.13 runs CUDA float32 convolutions in TF32 by default (``torch.backends.cudnn.conv.fp32_precision`` is
'tf32': a 10-bit mantissa in the products), so a GPU run would differ from the same run on CPU by far more than the
order of floating-point additions. ``set_float32_precision`` sets the convolutions' and the matrix products' choice
(cuDNN convolutions, cuBLAS matmuls) through torch's ``fp32_precision`` flags: 'ieee' by default, 'tf32' when the
param file allows it (``"tf32": true``). The flags exist on every build of torch and change nothing on a CPU (its
float32 kernels are IEEE float32 whatever they say).
"""
import torch


def set_float32_precision(tf32):
    """Sets the float32 precision of CUDA convolutions and matmuls: TF32 if ``tf32``, else IEEE float32; returns
    the flags now in force (``float32_precision``)."""
    precision = "tf32" if tf32 else "ieee"
    torch.backends.cudnn.conv.fp32_precision = precision
    torch.backends.cuda.matmul.fp32_precision = precision
    return float32_precision()


def float32_precision():
    """The float32 precision of CUDA convolutions and matmuls in force: {"conv": ..., "matmul": ...}, each 'ieee',
    'tf32' or torch's 'none' (its default: TF32 for convolutions, IEEE for matmuls)."""
    return {"conv": torch.backends.cudnn.conv.fp32_precision, "matmul": torch.backends.cuda.matmul.fp32_precision}
