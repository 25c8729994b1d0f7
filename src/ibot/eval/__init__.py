"""Checkpoint -> frozen features -> probes: feature extraction and k-NN."""
