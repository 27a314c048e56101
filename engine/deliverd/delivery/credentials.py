"""Which smart host login a message uses (docs/delivery.md, "Which login a message uses").

Pure: the envelope sender's account supplies the login when per-account auth is on and the
account has usable credentials; anything else falls back to the global ``auth``.
"""

from __future__ import annotations

from deliverd.config.model import Account, Config, Credentials


def credentials_for(sender: str, cfg: Config) -> Credentials | None:
    smarthost = cfg.routing.smarthost
    if smarthost is None:
        return None
    if smarthost.per_account_auth and sender:
        account = cfg.account_for(sender)
        if account is not None:
            own = _account_credentials(account, smarthost.use_account_mail_passwords)
            if own is not None:
                return own
    return smarthost.auth


def _account_credentials(account: Account, use_mail_password: bool) -> Credentials | None:
    if use_mail_password and account.mail_password:
        username = account.smarthost_auth.username if account.smarthost_auth else account.address
        return Credentials(username, account.mail_password)
    auth = account.smarthost_auth
    if auth is not None and auth.username and auth.password:
        return auth
    return None
