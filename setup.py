"""megatron_sparse24: 2:4 activation sparsity for squared-ReLU FFNs in megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron_sparse24",
    version="0.1.0",
    description=(
        "2:4 activation-sparse squared-ReLU FFNs for NVIDIA megatron-core "
        "(Haziza et al. 2025, arXiv 2503.16672)"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_sparse24", "megatron_sparse24.*"]),
    python_requires=">=3.10",
    # torch and triton are not pinned to one build: GPU users bring their own.
    install_requires=[
        "torch>=2.6",
        # 0.16.1 (the last release for Python < 3.12) through 0.19.x, the current release
        "megatron-core>=0.16.1,<0.20",
        "triton; platform_system == 'Linux'",
        "numpy",
        "psutil",
        "pyyaml",  # megatron.training (megatron-core 0.17) imports it without declaring it
    ],
    # cuda: the CUTLASS headers for the sm90 sparse GEMM backend (built with nvcc on first use, or
    # ahead of time with `python -m megatron_sparse24.cutlass.build`).
    extras_require={"test": ["pytest>=7", "tensorboard"], "tensorboard": ["tensorboard"],
                    "cuda": ["nvidia-cutlass>=4.2"]},
    package_data={"megatron_sparse24.cutlass": ["csrc/*.cuh"]},
)
