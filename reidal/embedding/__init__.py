"""Embedding: the default backbone, its Triton model repository and server, and the Triton client."""
