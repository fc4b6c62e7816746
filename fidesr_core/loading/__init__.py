"""Everything that opens a user's model file: safe reading and identification, the base model, the
families' weights (one layout table), the CLIP tokenizer and the assembled restorer."""
