"""Generated protobuf and gRPC code for the ice.* API (from protos/ice/**/*.proto)."""
