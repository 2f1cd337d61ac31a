"""HTTP helpers for untrusted peers: endpoint checks, a transport that connects only to the
address it checked, and the circuit breaker each remote endpoint has (DESIGN §5)."""
