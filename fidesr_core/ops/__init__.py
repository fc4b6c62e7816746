"""The numerical operations of one upscale, each a plain function on tensors: pre-processing, VAE codec,
restoration, latent tiling, frequency injection, detail map, colour fix.
"""
