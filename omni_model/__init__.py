"""Pure-PyTorch core of Omni-Diffusion: vocab, transformer, masking, templates, sampler.

This package never imports Ray or torch.distributed; parallelism and data movement live
in `pipelines/`.
"""
