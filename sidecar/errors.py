"""The sidecar's own errors and how each becomes an HTTP answer, in one place.

An answer the sidecar makes itself always carries the `X-Sidecar-Error` header and a
small JSON body `{"error": <stable code>, "message": ..., "sidecar": <name>}` so that a
caller can tell it from the app's own 502 or 503.
"""

from __future__ import annotations

import json

from .http.messages import Response

ERROR_HEADER = "X-Sidecar-Error"


class SidecarError(Exception):
    """Base of the errors that the sidecar answers for itself."""

    status = 500
    code = "internal_error"
    # The request's bytes can no longer be trusted to frame the next one: close after answering.
    close_connection = False

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:  # for answers without a class of their own (parse errors)
            self.status = status
        if code is not None:
            self.code = code


class UnknownService(SidecarError):
    status = 404
    code = "unknown_service"


class NoHealthyInstance(SidecarError):
    status = 503
    code = "no_healthy_instance"


class AppUnhealthy(SidecarError):
    status = 503
    code = "app_unhealthy"


class Draining(SidecarError):
    status = 503
    code = "draining"


class UpstreamConnectError(SidecarError):
    status = 502
    code = "upstream_connect_failed"


class UpstreamProtocolError(SidecarError):
    status = 502
    code = "upstream_bad_response"


class UpstreamTimeout(SidecarError):
    status = 504
    code = "upstream_timeout"


class BadRequest(SidecarError):
    status = 400
    code = "bad_request"
    close_connection = True


class MisdirectedRequest(SidecarError):
    status = 400
    code = "no_service_named"


class HeadersTooLarge(SidecarError):
    status = 431
    code = "request_headers_too_large"
    close_connection = True


class MethodNotAllowed(SidecarError):
    status = 405
    code = "method_not_allowed"
    close_connection = True


class NotImplementedTransferCoding(SidecarError):
    status = 501
    code = "transfer_coding_not_implemented"
    close_connection = True


class VersionNotSupported(SidecarError):
    status = 505
    code = "http_version_not_supported"
    close_connection = True


class RequestTimeout(SidecarError):
    status = 408
    code = "request_timeout"
    close_connection = True


class ClientClosed(SidecarError):
    """The client left before its request was whole: nobody reads this answer, but the
    access log and the metrics show it (nginx's 499)."""

    status = 499
    code = "client_closed_request"
    close_connection = True


class DiscoveryLimit(SidecarError):
    status = 503
    code = "too_many_services"


class UpstreamPoolFull(SidecarError):
    status = 503
    code = "upstream_pool_full"


class PayloadTooLarge(SidecarError):
    status = 413
    code = "request_body_too_large"
    close_connection = True


class ExpectationFailed(SidecarError):
    status = 417
    code = "expectation_failed"
    close_connection = True


class PeerIdentityMismatch(SidecarError):
    """The instance we dialled presented another service's certificate (or none that
    names a service): nothing was sent to it."""

    status = 502
    code = "peer_identity_mismatch"


class PeerWithoutMtls(SidecarError):
    """--mtls strict, and the only instances left do not speak mutual TLS."""

    status = 502
    code = "peer_without_mtls"


class MtlsRequired(SidecarError):
    """--mtls strict: a plaintext request on the inbound port; nothing reached the app."""

    status = 403
    code = "mtls_required"


class PermissionDenied(SidecarError):
    """The caller's verified identity may not call this service."""

    status = 403
    code = "permission_denied"


class IdentityUnavailableError(SidecarError):
    """No valid certificate: the sidecar cannot make or take mutual TLS calls now."""

    status = 503
    code = "identity_unavailable"


class RegistryUnavailableError(SidecarError):
    status = 503
    code = "registry_unavailable"


def error_body(err: SidecarError, sidecar_name: str, request_id: str | None = None) -> bytes:
    body = {"error": err.code, "message": err.message, "sidecar": sidecar_name}
    if request_id:
        body["request_id"] = request_id
    return json.dumps(body).encode() + b"\n"


def error_headers(err: SidecarError, request_id: str | None = None) -> list[tuple[str, str]]:
    headers = [(ERROR_HEADER, err.code), ("Content-Type", "application/json")]
    if request_id:
        headers.append(("X-Request-Id", request_id))
    return headers


def error_response(err: SidecarError, sidecar_name: str, request_id: str | None = None) -> Response:
    """The sidecar's own answer for `err`, for the inbound and outbound listeners."""
    return Response(
        err.status,
        error_headers(err, request_id),
        error_body(err, sidecar_name, request_id),
        close=err.close_connection,
        request_id=request_id,
    )
