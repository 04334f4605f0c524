"""The sidecar's own errors and how each becomes an HTTP answer, in one place.

An answer the sidecar makes itself always carries the `X-Sidecar-Error` header and a
small JSON body `{"error": <stable code>, "message": ..., "sidecar": <name>}` so that a
caller can tell it from the app's own 502 or 503.
"""

from __future__ import annotations

import json

from .http.grpc import encode_message
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


class AppProtocolMismatch(SidecarError):
    """A gRPC call for an app that speaks HTTP/1.1 (gRPC needs HTTP/2 all the way)."""

    status = 502
    code = "app_protocol_mismatch"


# The grpc-status a gRPC caller gets for each of the sidecar's own errors (the issue's
# table: unavailable 14, deadline 4, denied 7, unknown service 5, overload 8); codes not
# listed are 13 INTERNAL, as gRPC maps a 4xx it cannot place.
GRPC_STATUS = {
    "unknown_service": 5,
    "no_healthy_instance": 14,
    "app_unhealthy": 14,
    "draining": 14,
    "upstream_connect_failed": 14,
    "upstream_bad_response": 14,
    "peer_identity_mismatch": 14,
    "peer_without_mtls": 14,
    "identity_unavailable": 14,
    "registry_unavailable": 14,
    "upstream_timeout": 4,
    "request_timeout": 4,
    "permission_denied": 7,
    "mtls_required": 16,
    "service_overloaded": 8,
    "upstream_pool_full": 8,
    "too_many_connections": 8,
    "too_many_services": 8,
    "request_body_too_large": 8,
    "client_closed_request": 1,
    "no_service_named": 3,
    "app_protocol_mismatch": 12,
}


def grpc_status(err: SidecarError) -> int:
    return GRPC_STATUS.get(err.code, 13)


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


def error_response(
    err: SidecarError, sidecar_name: str, request_id: str | None = None, *, grpc: bool = False
) -> Response:
    """The sidecar's own answer for `err`, for the inbound and outbound listeners; for a
    gRPC caller (`grpc`), a trailers-only HTTP 200 with grpc-status and grpc-message."""
    if grpc:
        headers = [
            ("content-type", "application/grpc"),
            ("grpc-status", str(grpc_status(err))),
            ("grpc-message", encode_message(f"micro-sidecar {sidecar_name}: {err.message}")),
            (ERROR_HEADER, err.code),
        ]
        if request_id:
            headers.append(("X-Request-Id", request_id))
        response = Response(200, headers, b"", request_id=request_id)
        response.grpc_status = headers[1][1]
        return response
    return Response(
        err.status,
        error_headers(err, request_id),
        error_body(err, sidecar_name, request_id),
        close=err.close_connection,
        request_id=request_id,
    )
