"""Training: SpCL-style self-paced contrastive learning on NP3-refined pseudo-labels (no gRPC)."""
