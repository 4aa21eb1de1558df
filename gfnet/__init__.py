"""gfnet: a high-performance engine for Glance-and-Focus Networks."""
__version__ = "0.1.0"
