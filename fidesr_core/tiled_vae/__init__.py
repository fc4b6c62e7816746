"""The tiled VAE: encode and decode with whole-image GroupNorm statistics in memory bounded by the tile.
Only ``codec`` (and ``budget``, its memory setting) is meant for callers."""
