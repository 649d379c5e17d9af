"""Evaluation: a classifier for offline feature extraction, torch-fidelity feature extractors and the `fid` job."""
