"""fedlink: federated learning over mutually-authenticated gRPC."""

__version__ = "0.1.0"
