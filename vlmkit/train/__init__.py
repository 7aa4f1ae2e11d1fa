"""Training of the shipped shapes models (seeded, resumable, CPU-sized)."""
