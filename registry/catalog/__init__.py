"""The catalog: models and their VRAM in PostgreSQL, the file form, writes over HTTP and CLI.

document (the file form and its validation), plan (what an apply changes), store (plain SQL),
sync (LISTEN/NOTIFY into the view), api (HTTP handlers), schemas (their shapes), cli.
"""
