"""The training engine: no Qt here, ever (tests/engine/test_no_qt.py enforces it)."""

from studio.engine.offline import force_offline

force_offline()
