"""One module per app screen (Textual mode)."""
