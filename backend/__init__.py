"""dreamtty backend: requests, queue, workers, pipelines, training.

Importing this package (and any module not under ``backend.engine`` or
``backend.training``) never imports torch, diffusers, transformers or textual.
"""
