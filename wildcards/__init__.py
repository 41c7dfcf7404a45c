"""Shipped wildcard lists: ``__name__`` in a prompt picks a line of ``name.txt``."""
