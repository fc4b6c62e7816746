"""The tiled VAE: encode and decode with whole-image GroupNorm statistics. Only ``codec`` is meant for
callers; the other modules are internal to this package.
"""
