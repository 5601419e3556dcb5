"""The testbed's certificate authority (openssl, P-256 keys): the API server trusts it for client
certificates (the real node's kubelet logs in as ``system:node:real-0``) and the kubelet trusts it for
the API server's kubelet client certificate, so logs, exec and the kubelet API need no anonymous
access."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@dataclass(frozen=True)
class CertificateAuthority:
    directory: Path

    @property
    def cert(self) -> Path:
        return self.directory / "testbed-ca.crt"

    @property
    def key(self) -> Path:
        return self.directory / "testbed-ca.key"

    def ensure(self) -> CertificateAuthority:
        if not self.cert.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            _openssl(
                "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", str(self.key), "-out", str(self.cert), "-days", "7",
                "-subj", "/CN=kubemeter-testbed-ca",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            )  # fmt: skip
            self.key.chmod(0o600)
        return self

    def issue(
        self,
        name: str,
        common_name: str,
        organizations: tuple[str, ...] = (),
        ip_sans: tuple[str, ...] = (),
        dns_sans: tuple[str, ...] = (),
    ) -> KeyPair:
        """A certificate for a client (``organizations`` become its groups) or, with SANs, a server."""
        pair = KeyPair(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        if pair.cert.exists():
            return pair
        subject = f"/CN={common_name}" + "".join(f"/O={org}" for org in organizations)
        csr = self.directory / f"{name}.csr"
        usage = "serverAuth" if ip_sans or dns_sans else "clientAuth"
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(pair.key), "-out", str(csr), "-subj", subject,
        )  # fmt: skip
        extensions = self.directory / f"{name}.ext"
        lines = [
            "basicConstraints=CA:FALSE",
            "keyUsage=critical,digitalSignature",
            f"extendedKeyUsage={usage}",
        ]
        sans = [f"IP:{ip}" for ip in ip_sans] + [f"DNS:{dns}" for dns in dns_sans]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        extensions.write_text("\n".join(lines) + "\n")
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-CAcreateserial", "-days", "7", "-out", str(pair.cert), "-extfile", str(extensions),
        )  # fmt: skip
        pair.key.chmod(0o600)
        csr.unlink()
        extensions.unlink()
        return pair
