"""The desktop window (PySide6): pages bound to a JobModel, training in a worker thread."""
