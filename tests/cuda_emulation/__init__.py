"""CPU emulation of the CUDA kernels (see run.py): ``python -m tests.cuda_emulation``."""
