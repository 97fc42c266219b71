"""Generated protobuf/gRPC stubs for package sith.v1 (run proto/generate.py; do not edit)."""
