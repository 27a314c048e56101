"""Talking SMTP (and POP3) to the next hop: sessions, the session pool, the transport, TLS plans,
and the translation of library errors into engine outcomes."""
