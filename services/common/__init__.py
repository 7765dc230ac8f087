"""What every ICE service shares: settings, errors, the model bundle, image I/O and the gRPC runtime."""
