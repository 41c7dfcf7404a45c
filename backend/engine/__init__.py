"""Torch-using code. Imported only inside worker and trainer processes (and tests)."""
