"""Image data: real datasets, the reference classifier, diffusion generators, VoG, perceptual-hash dedup.

Heavy libraries (torch, diffusers, transformers, imagehash) are imported inside the functions that need them.
"""
