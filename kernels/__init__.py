"""Attention and LoRA kernels: Triton on CUDA, a pure-torch twin on CPU, chosen in dispatch."""
