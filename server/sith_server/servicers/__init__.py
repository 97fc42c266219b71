"""One servicer per sith.v1 service; each validates its requests and raises plain exceptions
(the error interceptor turns them into rich gRPC statuses)."""
