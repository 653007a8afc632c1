"""The gateway: routes meshserve.v1.Inference calls to workers and forwards them."""
