"""FiDeSR training: data degradation, trainer and evaluation (built on fidesr_core, never imports ComfyUI)."""
