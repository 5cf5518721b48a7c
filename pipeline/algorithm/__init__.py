"""Token-level returns, KL penalties, advantage estimators and policy losses (the `algorithm.*` config keys)."""
