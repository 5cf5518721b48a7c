"""What runs inside an actor: receiving published weights, torch thread counts, the stale-weights error."""
