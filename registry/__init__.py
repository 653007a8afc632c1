"""The etcd registry: lease-bound worker records and the gateway's view of them."""
