"""Image sources, token shards and the `encode` job that turns one into the other."""
