"""Running the service: what keeps it honest towards systemd (DESIGN §5)."""
