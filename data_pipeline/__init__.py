"""lorafleet data_pipeline."""
