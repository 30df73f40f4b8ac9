"""What operators look at: the status page at GET / and the `status` command in a terminal."""
