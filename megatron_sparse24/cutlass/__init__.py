"""Our CUTLASS 3.x sm90 2:4 GEMM kernels: ``build`` compiles them into a plain C shared library
(nvcc + the nvidia-cutlass headers), ``library`` loads it with ctypes and runs its kernels on torch
tensors. ``backends.CutlassGemm`` dispatches among them; nothing here imports torch extensions."""
