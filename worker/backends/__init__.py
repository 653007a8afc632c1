"""Engine adapters. Each knows nothing of gRPC; see base.Backend."""
