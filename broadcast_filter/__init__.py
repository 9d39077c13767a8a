"""broadcast_filter: a live StreamDiffusion filter for streamers and broadcast operators."""

__version__ = "0.1.0"
