"""What a run writes and how to read it: metrics, dumps, trackers, reports, the samples view, next steps."""
