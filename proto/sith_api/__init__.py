"""The SITH API: the sith.v1 protobuf messages and gRPC stubs, and the field bounds they declare.

Shared by the server, the workers and the SDK, so a request and a result each have one schema:

    from sith_api.v1 import sith_pb2 as pb
    from sith_api import bounds
    bounds.check(pb.FindConceptRequest(concepts=["red"], top=0))   # fills nothing, raises on bad fields

Installs with protobuf and grpcio only (no torch, no Redis).
"""

__version__ = "0.2.0"
