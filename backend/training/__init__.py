"""DreamBooth training: request, run directories, launcher (no torch) and the trainer (torch).

Torch-free, importable by the TUI: ``config``, ``runs``, ``launch``, ``images``, ``words``.
Imported only inside the trainer process: ``run``, ``trainer`` and the modules it uses.
"""
