"""fedshield: privacy-preserving, poisoning-resistant federated training on Flower."""

from fedshield.layout import install_source_finder

__version__ = "0.1.0"

# A source checkout keeps server/, client/, ... beside fedshield/: map fedshield.<name> to them
# (an installed fedshield has them inside; fedshield/layout.py explains both).
install_source_finder()
