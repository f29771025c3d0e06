"""dramatiq actors: thin adapters from messages to `pipeline` stage functions."""
