"""The agent reads its API credentials itself, and a rotated ServiceAccount token is picked up live."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest
from kubemeter.sources.kube import CredentialsError, KubeCredentials


@pytest.fixture
def ca_pem(tmp_path: Path) -> bytes:
    key, cert = tmp_path / "ca.key", tmp_path / "ca.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=test-ca", "-days", "1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert.read_bytes()


def kubeconfig(tmp_path: Path, cluster: dict[str, object], user: dict[str, object]) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        json.dumps(
            {
                "current-context": "c",
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                "clusters": [{"name": "k", "cluster": cluster}],
                "users": [{"name": "u", "user": user}],
            }
        )
    )
    return path


def test_a_rotated_token_file_is_used_without_a_restart(tmp_path: Path, ca_pem: bytes) -> None:
    (tmp_path / "ca.crt").write_bytes(ca_pem)
    token = tmp_path / "token"
    token.write_text("first\n")
    path = kubeconfig(
        tmp_path,
        {"server": "https://127.0.0.1:6443/", "certificate-authority": "ca.crt"},
        {"tokenFile": "token"},
    )
    credentials = KubeCredentials.load(str(path))
    assert credentials.host == "https://127.0.0.1:6443"
    assert credentials.token == "first"
    token.write_text("second\n")
    os.utime(token, ns=(1, 1))  # a different mtime, as the kubelet's atomic swap gives
    assert credentials.token == "second"


def test_inline_ca_data_and_a_static_token_are_read(tmp_path: Path, ca_pem: bytes) -> None:
    path = kubeconfig(
        tmp_path,
        {"server": "https://10.0.0.1", "certificate-authority-data": base64.b64encode(ca_pem).decode()},
        {"token": "abc"},
    )
    credentials = KubeCredentials.load(str(path))
    assert credentials.token == "abc"
    assert credentials.ssl_context is not False


def test_in_cluster_credentials_come_from_the_service_account_mount(
    tmp_path: Path, ca_pem: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ca.crt").write_bytes(ca_pem)
    (tmp_path / "token").write_text("sa-token")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    credentials = KubeCredentials.in_cluster(str(tmp_path))
    assert credentials.host == "https://[fd00::1]:443"
    assert credentials.token == "sa-token"


def test_an_exec_user_is_refused_with_the_supported_alternatives(tmp_path: Path) -> None:
    path = kubeconfig(
        tmp_path, {"server": "https://x", "insecure-skip-tls-verify": True}, {"exec": {"command": "aws"}}
    )
    with pytest.raises(CredentialsError, match="use a token, a tokenFile or a client certificate"):
        KubeCredentials.load(str(path))


def test_outside_a_cluster_without_a_kubeconfig_the_error_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(CredentialsError, match="no --kubeconfig"):
        KubeCredentials.load(None)
