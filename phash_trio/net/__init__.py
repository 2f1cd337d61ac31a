"""HTTP helpers for untrusted peers: endpoint checks and a transport that connects only to the
address it checked (DESIGN §5)."""
