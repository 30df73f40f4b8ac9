"""The status page at GET /: a server-rendered view for operators, updated live from /events."""
