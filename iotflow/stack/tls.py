"""A throwaway certificate authority for the local stack's TLS listeners (openssl, Debian's).

Made once per stack folder: a CA (P-256, ten years) that signs one server certificate for
``127.0.0.1`` and ``localhost`` (two years); the CA's key is deleted once it has signed, so the
CA can vouch for nothing else. Clients trust ``ca.crt`` (IOTFLOW_MQTT_CA_FILE). Nothing here is
for production, whose certificates come from the operator (docs/security.md).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from iotflow.stack.base import require_binary, run


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def at(cls, folder: Path) -> TlsFiles:
        return cls(folder / "ca.crt", folder / "server.crt", folder / "server.key")

    def exist(self) -> bool:
        return self.ca.is_file() and self.cert.is_file() and self.key.is_file()


def throwaway_ca(folder: Path) -> TlsFiles:
    """The CA and server certificate in ``folder``, made if any is missing."""
    files = TlsFiles.at(folder)
    if files.exist():
        return files
    openssl = require_binary("openssl", "openssl")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        work = Path(scratch)
        ca_key, csr, extensions = work / "ca.key", work / "server.csr", work / "server.ext"
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        run([openssl, "req", "-x509", *ec, "-days", "3650", "-subj", "/CN=iotflow local stack CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", str(ca_key), "-out", str(work / "ca.crt")], timeout=60, what="making the stack's CA")
        run([openssl, "req", *ec, "-subj", "/CN=localhost", "-keyout", str(work / "server.key"), "-out", str(csr)],
            timeout=60, what="making the stack's server key")
        extensions.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                              "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
                              "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
        run([openssl, "x509", "-req", "-in", str(csr), "-CA", str(work / "ca.crt"), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", "730", "-extfile", str(extensions), "-out", str(work / "server.crt")],
            timeout=60, what="signing the stack's server certificate")
        os.chmod(work / "server.key", 0o600)
        # The certificate and key first, the CA last: a half-made set is made again next time.
        for name in ("server.key", "server.crt", "ca.crt"):
            os.replace(work / name, folder / name)
    return files
