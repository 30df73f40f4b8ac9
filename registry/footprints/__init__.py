"""Footprints learned from real loads: samples in PostgreSQL per (model, GPU product), written
from this host's instances and read back, for every host, as each model's observed size.

store (plain SQL), recorder (the queue that survives a database outage, and LISTEN/NOTIFY into
the view), api (GET and DELETE /models/{id}/footprint).
"""
