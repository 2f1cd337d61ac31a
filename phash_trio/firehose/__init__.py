"""The firehose: Jetstream event parsing (pure), the reader (connection, failover, replay
dedup) and the low-watermark cursor (DESIGN §5)."""
