"""`tokenforge tune`: the spec and the Ray Tune experiment."""
