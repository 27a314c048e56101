"""``sendmail``: what a local program runs to hand a message over (cron, PHP's mail(), mailx,
git send-email), parsed once, judged by the local address rules and left in the maildrop the
daemon's pickup reads; ``-bs`` is the same submission as an SMTP dialogue on stdin and stdout.
Run per message, so every module on a submission's import path imports only what the
interpreter loads at start-up."""
