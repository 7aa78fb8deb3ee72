"""The operator's Kubernetes API client: every request carries a timeout.

A call to a hung or overloaded API server then fails the pass that made it (which goes back
to the queue) instead of holding a worker thread forever.
"""

from __future__ import annotations

from typing import Any, Final

from kubernetes import client, config

# (connect, read) seconds for calls that do not set their own (watches do).
DEFAULT_TIMEOUT: Final = (5.0, 20.0)
# Connections kept per API server: passes run in parallel and fan their calls out.
POOL_SIZE: Final = 32


class TimedApiClient(client.ApiClient):  # type: ignore[misc]
    """`client.ApiClient` with a default `_request_timeout`."""

    def __init__(
        self, configuration: Any = None, timeout: tuple[float, float] = DEFAULT_TIMEOUT
    ) -> None:
        super().__init__(configuration)
        self.timeout = timeout

    def call_api(
        self,
        method: str,
        url: str,
        header_params: Any = None,
        body: Any = None,
        post_params: Any = None,
        _request_timeout: Any = None,
    ) -> Any:
        return super().call_api(
            method,
            url,
            header_params,
            body,
            post_params,
            _request_timeout=_request_timeout or self.timeout,
        )


def load_client(
    kubeconfig: str | None = None, timeout: tuple[float, float] = DEFAULT_TIMEOUT
) -> TimedApiClient:
    """A client for the in-cluster service account, else the kubeconfig (`kubeconfig` or
    $KUBECONFIG / ~/.kube/config)."""
    configuration = client.Configuration()
    configuration.connection_pool_maxsize = POOL_SIZE
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
            return TimedApiClient(configuration, timeout)
        except config.ConfigException:
            pass
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return TimedApiClient(configuration, timeout)
