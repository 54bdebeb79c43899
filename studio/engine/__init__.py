"""The training engine: no Qt here, ever (tests/engine/test_no_qt.py enforces it)."""

from studio.engine.offline import force_offline
from studio.engine.quiet import quiet_known_noise

force_offline()
quiet_known_noise()
