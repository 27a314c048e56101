"""How mail enters the engine: the SMTP listener, the maildrop that `deliverd sendmail` writes
into and the pickup that takes it into the queue, and the rules for local users' mail."""
