"""lorafleet cluster."""
