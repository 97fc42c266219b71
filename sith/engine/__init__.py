"""The SITH engine: pure tensor math (decomposition, joint space, dictionary, sparse coding).

Nothing in this package imports gRPC, Redis or the CLI; the service wraps it.
"""
