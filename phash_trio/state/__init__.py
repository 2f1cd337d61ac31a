"""State kept in Redis: the hash cache, claims, daily caps, dead letters and health (store), and
the decision log (audit trail)."""
