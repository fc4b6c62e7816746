"""Everything that opens a user's model file: safe ``torch.load``, file sniffing and identification,
the base model (diffusers folder or single file), FiDeSR weights (read, write, validate) and
assembling the model.
"""
