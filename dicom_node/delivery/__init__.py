"""Delivery: the outbox (queue, send, confirm), the C-STORE sender, storage commitment, and
destination profiles (what a PACS or a TPS accepts)."""
