"""What is loaded on this host: instances (a model loaded by a process on a GPU), bound from a
reservation or adopted; their activity, pins, sessions and priority; what they teach the
footprints; their API and commands."""
