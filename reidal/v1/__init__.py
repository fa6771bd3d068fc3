"""Generated protobuf and gRPC code for the reidal.v1 API (built from protos/ by `make proto`)."""
