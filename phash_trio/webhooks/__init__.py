"""Signed webhook deliveries of the decision log: subscriptions, signing, delivery."""
