"""The SITH gRPC server: servicers, auth, errors, health, metrics and configuration.

It validates requests, answers embeddings in-process, and hands slow engine work to the workers
through the Redis job queue (``sith_workers``).
"""
