"""Watching: blocking GETs (If-None-Match + Prefer: wait) and the /events stream."""
