"""Everything that opens a user's model file: safe reading and identification (``files``, ``identify``),
the base model (``base_model``), the weights of the three families (``layouts``, ``weights``), the CLIP
tokenizer and putting a restorer together (``restorer``).
"""
