"""The command line and what it needs around the engine: batches of image files, ``doctor``,
``download`` and image I/O.
"""
