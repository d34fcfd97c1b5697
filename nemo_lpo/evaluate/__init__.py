"""Held-out ranking evaluation of a policy checkpoint on a packed listwise dataset."""
