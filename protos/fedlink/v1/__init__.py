"""Generated protobuf and gRPC code for the fedlink.v1 protocol (see scripts/generate_protos.py)."""
