"""Video I/O: frame conversion, sources and sinks."""
