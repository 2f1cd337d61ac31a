"""State kept in Redis beyond the pipeline's own keys: the decision log (audit trail)."""
