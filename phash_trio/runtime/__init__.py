"""Running the service: wiring of its components, systemd notify, log output, metrics, progress
(DESIGN §5)."""
