"""Data: images, video and the procedurally generated shapes world with its benchmarks."""
