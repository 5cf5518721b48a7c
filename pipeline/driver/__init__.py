"""The driver loop and what it runs on: actor groups, placement on the cluster, weight sync."""
