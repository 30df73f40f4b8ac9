"""HTTPS: the certificate and key from files, reloadable in place (SIGHUP) for rotation."""

from __future__ import annotations

import ssl
from pathlib import Path


class TlsFiles:
    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = self._new_context()

    def _new_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def reload(self) -> None:
        """Load the pair again into the live context: new connections get the new certificate.

        The pair is tried on a scratch context first, so a bad file (half-written, mismatched)
        raises here and leaves the certificate in use as it was.
        """
        self._new_context()
        self.context.load_cert_chain(self.cert_file, self.key_file)
