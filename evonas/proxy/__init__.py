"""Proxy tasks: the small, fast trainings that score a candidate normalization-activation layer.

The flow is data (load_dataset) -> models (build_model around the candidate's layer factory)
-> train (train_proxy), and the rejection stages and the search call train_proxy for every
candidate they evaluate.
"""
