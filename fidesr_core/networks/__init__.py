"""The networks and their containers: the base model's parts, the assembled restorer, the weights of
the three families, the LRRB, the LoRA layout, prompt embeddings and tiny random models for tests.
"""
