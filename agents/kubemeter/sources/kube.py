"""A small asyncio client for the Kubernetes API: GET, LIST and WATCH of raw JSON objects.

Plain HTTP (aiohttp) instead of the official client, because the official client is blocking and
deserialises into heavy model objects; the agent needs dicts, one event loop and no threads. The
official client is used only to read the kubeconfig or in-cluster credentials.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class KubeApiError(Exception):
    """The API server refused a request; the message carries its status and reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class WatchExpired(Exception):
    """The resourceVersion is too old (HTTP 410); list again."""


@dataclass
class KubeCredentials:
    host: str
    ssl_context: ssl.SSLContext | bool
    token: str | None = None

    @classmethod
    def load(cls, kubeconfig: str | None = None) -> KubeCredentials:
        """From ``kubeconfig`` if given, else in-cluster (the pod's service account)."""
        from kubernetes import client, config  # only for credential discovery

        configuration = client.Configuration()
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        context: ssl.SSLContext | bool
        if configuration.verify_ssl:
            context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
            if configuration.cert_file:
                context.load_cert_chain(configuration.cert_file, configuration.key_file)
        else:
            context = False
        token = configuration.api_key.get("authorization") or configuration.api_key.get("BearerToken")
        if token and token.lower().startswith("bearer "):
            token = token[7:]
        return cls(configuration.host.rstrip("/"), context, token)


class KubeApi:
    def __init__(self, credentials: KubeCredentials, session: aiohttp.ClientSession) -> None:
        self.credentials = credentials
        self.session = session

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.credentials.token:
            headers["Authorization"] = f"Bearer {self.credentials.token}"
        return headers

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        async with self.session.get(
            self.credentials.host + path,
            params=dict(params or {}),
            headers=self._headers(),
            ssl=self.credentials.ssl_context,
            timeout=aiohttp.ClientTimeout(total=60),
        ) as response:
            body = await response.text()
            if response.status == 410:
                raise WatchExpired(body)
            if response.status >= 400:
                raise KubeApiError(
                    response.status,
                    f"GET {path} answered {response.status}: {body[:300]}; check the agent's RBAC "
                    "(it needs get/list/watch on pods, namespaces and nodes)",
                )
            result: dict[str, Any] = json.loads(body)
            return result

    async def watch(
        self, path: str, params: Mapping[str, str], resource_version: str, timeout_s: int = 300
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Yield ``(type, object)`` until the server ends the watch; 410 raises :class:`WatchExpired`."""
        query = {
            **params,
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
        }
        async with self.session.get(
            self.credentials.host + path,
            params=query,
            headers=self._headers(),
            ssl=self.credentials.ssl_context,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout_s + 30),
        ) as response:
            if response.status == 410:
                raise WatchExpired(await response.text())
            if response.status >= 400:
                raise KubeApiError(
                    response.status, f"WATCH {path}: {response.status} {await response.text()}"
                )
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    if (event.get("object") or {}).get("code") == 410:
                        raise WatchExpired(str(event))
                    raise KubeApiError(int((event.get("object") or {}).get("code") or 500), str(event))
                yield event["type"], event["object"]
