"""Holding up under hostile and sloppy clients: descriptor limits, a cap on connections with
eviction of the idle and the half-open, request head and body timeouts, and TLS."""
