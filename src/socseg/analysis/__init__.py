"""What a study publishes from label volumes: microstructure metrics, and the figures."""
