"""lorafleet launch."""
