"""What the coordinator and the clients share: wire encoding, tensors, PKI, config, tasks."""
