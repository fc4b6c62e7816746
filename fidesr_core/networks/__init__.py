"""The networks and their containers: the base model's parts, the assembled FiDeSR model, the FiDeSR
weights, the LRRB, the LoRA layout, the empty-prompt embedding and tiny random models for tests.
"""
