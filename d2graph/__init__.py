"""d2graph."""
