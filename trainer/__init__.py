"""lorafleet trainer."""
