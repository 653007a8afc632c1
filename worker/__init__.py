"""The worker: one process per device, serving meshserve.v1.Inference from its backends."""
