"""TLS for the admission webhook from mounted certificate files, reloaded when they change.

The certificate (cert-manager, or a Secret mounted as a volume) is rotated by replacing the
files; the webhook must present the new one without a restart. The server's ``SSLContext`` has
an ``sni_callback``, which OpenSSL calls for every ClientHello (with or without SNI): it checks
the files' signatures (mtime, size, inode: a kubelet volume update swaps a symlink) and, when
they changed, loads a complete new context and hands the connection to it. A half-written pair
(certificate and key that do not match) fails to load; the old context keeps serving and the
next handshake tries again.
"""

from __future__ import annotations

import logging
import os
import ssl

log = logging.getLogger("spendgate.operator.admission")

Signature = tuple[tuple[int, int, int], ...]


class ReloadingTLS:
    """``context`` is the server's SSLContext; it always serves the files' current pair."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self._signature = self._stat()
        self._active = self._load()  # raises at start: a webhook without a certificate is useless
        self.context = self._load()
        self.context.sni_callback = self._select
        self.reloads = 0

    def _stat(self) -> Signature:
        stats = (os.stat(self.cert_file), os.stat(self.key_file))
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in stats)

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def refresh(self) -> bool:
        """Load the files again if they changed; True when a new pair is now served."""
        try:
            signature = self._stat()
            if signature == self._signature:
                return False
            context = self._load()
        except (OSError, ssl.SSLError) as error:
            log.warning(
                "webhook certificate not reloaded; serving the previous one",
                extra={"cert_file": self.cert_file, "error": repr(error)},
            )
            return False
        self._active, self._signature = context, signature
        self.reloads += 1
        log.info("webhook certificate reloaded", extra={"cert_file": self.cert_file})
        return True

    def _select(self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext):
        try:
            self.refresh()
            connection.context = self._active
        except Exception:  # an exception here would abort the handshake
            log.exception("webhook certificate selection failed")
        return None
