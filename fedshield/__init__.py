"""fedshield: privacy-preserving, poisoning-resistant federated training on Flower."""

__version__ = "0.1.0"
