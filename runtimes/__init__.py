"""edgetk.runtimes: one Session over every runtime; the LLM generation loop; the measurement harness."""
from .session import SESSION_BACKENDS, Session, SessionBackend

__all__ = ["SESSION_BACKENDS", "Session", "SessionBackend"]
