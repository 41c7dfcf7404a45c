"""Reusable widgets: image preview, job progress, form fields, style picker, mode bar."""
