"""Our Ozone moderation service: the XRPC client and session, emitEvent bodies, and the start-up
check of what the automod account may do (DESIGN §5)."""
