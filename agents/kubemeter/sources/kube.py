"""A small asyncio client for the Kubernetes API: GET, LIST and WATCH of raw JSON objects.

Plain HTTP (httpx) instead of the official client, because the official client is blocking and
deserialises into heavy model objects; the agent needs dicts, one event loop and no threads. Even
importing the official client costs the agent ~30 MiB of RSS, so credentials are read here too.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class KubeApiError(Exception):
    """The API server refused a request; the message carries its status and reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class WatchExpired(Exception):
    """The resourceVersion is too old (HTTP 410); list again."""


class CredentialsError(ValueError):
    """The kubeconfig or the in-cluster service account cannot be used; the message says why."""


@dataclass
class KubeCredentials:
    """Where the API server is and how to authenticate to it.

    A token from a file (the in-cluster projected ServiceAccount token, or a kubeconfig
    ``tokenFile``) is re-read when the file changes: the kubelet rotates it while the agent runs.
    """

    host: str
    ssl_context: ssl.SSLContext | bool
    static_token: str | None = None
    token_file: Path | None = None
    _file_token: str | None = None
    _file_mtime_ns: int = -1

    @property
    def token(self) -> str | None:
        if self.token_file is None:
            return self.static_token
        try:
            mtime_ns = self.token_file.stat().st_mtime_ns
            if mtime_ns != self._file_mtime_ns:
                self._file_token = self.token_file.read_text().strip()
                self._file_mtime_ns = mtime_ns
        except OSError:
            pass  # mid-rotation (the kubelet swaps a symlink): keep the last token
        return self._file_token

    @classmethod
    def load(cls, kubeconfig: str | None = None) -> KubeCredentials:
        """From ``kubeconfig`` if given, else in-cluster (the pod's service account)."""
        return cls.from_kubeconfig(Path(kubeconfig)) if kubeconfig else cls.in_cluster()

    @classmethod
    def in_cluster(cls, directory: str = SERVICE_ACCOUNT_DIR) -> KubeCredentials:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise CredentialsError(
                "not in a cluster (KUBERNETES_SERVICE_HOST unset) and no --kubeconfig given"
            )
        if ":" in host:  # IPv6
            host = f"[{host}]"
        context = ssl.create_default_context(cafile=f"{directory}/ca.crt")
        return cls(f"https://{host}:{port}", context, token_file=Path(directory) / "token")

    @classmethod
    def from_kubeconfig(cls, path: Path) -> KubeCredentials:
        """The current context of a kubeconfig file: server, CA, token or client certificate."""
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise CredentialsError(f"kubeconfig {path}: {error}") from error

        def named(section: str, name: str) -> dict[str, Any]:
            for entry in config.get(section) or []:
                if entry.get("name") == name:
                    return dict(entry.get(section[:-1]) or {})
            raise CredentialsError(f"kubeconfig {path}: no {section[:-1]} named {name!r}")

        context = named("contexts", config.get("current-context") or "")
        cluster = named("clusters", context.get("cluster") or "")
        user = named("users", context.get("user") or "") if context.get("user") else {}
        if "exec" in user or "auth-provider" in user:
            raise CredentialsError(
                f"kubeconfig {path}: exec and auth-provider users are not supported; use a token, "
                "a tokenFile or a client certificate"
            )
        base = path.parent

        def file_or_data(key: str, tmp_name: str) -> str | None:
            if data := cluster.get(f"{key}-data") or user.get(f"{key}-data"):
                target = Path(tempfile.mkdtemp(prefix="kubemeter-")) / tmp_name
                target.write_bytes(base64.b64decode(data))
                return str(target)
            if file := cluster.get(key) or user.get(key):
                return str(base / file)
            return None

        server = str(cluster.get("server") or "").rstrip("/")
        if not server:
            raise CredentialsError(f"kubeconfig {path}: the cluster has no server")
        ssl_context: ssl.SSLContext | bool
        if cluster.get("insecure-skip-tls-verify"):
            ssl_context = False
        else:
            ssl_context = ssl.create_default_context(cafile=file_or_data("certificate-authority", "ca.crt"))
            certificate = file_or_data("client-certificate", "client.crt")
            if certificate:
                ssl_context.load_cert_chain(certificate, file_or_data("client-key", "client.key"))
        token_file = user.get("tokenFile")
        return cls(
            server,
            ssl_context,
            static_token=user.get("token"),
            token_file=base / token_file if token_file else None,
        )


class KubeApi:
    def __init__(self, credentials: KubeCredentials) -> None:
        self.credentials = credentials
        # Watches hold a connection each; reads wait up to the watch's own timeout (+30 s).
        self.client = httpx.AsyncClient(
            base_url=credentials.host,
            verify=credentials.ssl_context,
            timeout=httpx.Timeout(60.0, connect=10.0),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=4),
            trust_env=False,  # the API server is reached directly, as the official client does
        )

    async def close(self) -> None:
        await self.client.aclose()

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.credentials.token:
            headers["Authorization"] = f"Bearer {self.credentials.token}"
        return headers

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        response = await self.client.get(path, params=dict(params or {}), headers=self._headers())
        body = response.text
        if response.status_code == 410:
            raise WatchExpired(body)
        if response.status_code >= 400:
            raise KubeApiError(
                response.status_code,
                f"GET {path} answered {response.status_code}: {body[:300]}; check the agent's RBAC "
                "(it needs list/watch on pods and namespaces and get on nodes)",
            )
        result: dict[str, Any] = json.loads(body)
        return result

    async def watch(
        self,
        path: str,
        params: Mapping[str, str],
        resource_version: str,
        timeout_s: int = 300,
        on_open: Callable[[], None] | None = None,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Yield ``(type, object)`` from ``resource_version`` on until the server ends the watch.

        Bookmarks are asked for (``allowWatchBookmarks``): they move the resume point on quiet
        nodes, and the API server sends one 2 s before ``timeout_s`` ends. ``on_open`` runs once the
        server accepted the watch. A resourceVersion the server no longer has (410) raises
        :class:`WatchExpired`.
        """
        query = {
            **params,
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
        }
        async with self.client.stream(
            "GET",
            path,
            params=query,
            headers=self._headers(),
            timeout=httpx.Timeout(10.0, read=timeout_s + 30.0),
        ) as response:
            if response.status_code >= 400:
                body = (await response.aread()).decode(errors="replace")
                if response.status_code == 410:
                    raise WatchExpired(body)
                raise KubeApiError(response.status_code, f"WATCH {path}: {response.status_code} {body}")
            if on_open is not None:
                on_open()
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    if (event.get("object") or {}).get("code") == 410:
                        raise WatchExpired(str(event))
                    raise KubeApiError(int((event.get("object") or {}).get("code") or 500), str(event))
                yield event["type"], event["object"]
