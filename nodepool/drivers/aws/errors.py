"""How AWS errors map onto ``nodepool.errors``: a pure function of the error code and status.

The launcher acts on the class: ``QuotaError`` pauses the pool and keeps the request,
``TransientCloudError`` is worth retrying (the adapter retries those itself a few times first),
``PermanentCloudError`` fails the attempt, ``InstanceNotFound`` means the thing is already gone.
"""
from ...errors import (CloudError, InstanceNotFound, PermanentCloudError, QuotaError,
                       TransientCloudError)

QUOTA_CODES = frozenset({
    "InsufficientInstanceCapacity", "VcpuLimitExceeded", "InstanceLimitExceeded",
    "MaxSpotInstanceCountExceeded", "InsufficientHostCapacity", "InsufficientCapacity",
    "VolumeLimitExceeded", "SpotMaxPriceTooLow",
})
THROTTLE_CODES = frozenset({
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "ThrottledException",
    "RequestThrottled", "RequestThrottledException", "TooManyRequestsException",
    "SlowDown", "EC2ThrottledException", "PriorRequestNotComplete",
    "InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable",
    "ServiceUnavailableException", "RequestTimeout", "RequestTimeoutException",
})
AUTH_CODES = frozenset({
    "AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "SignatureDoesNotMatch",
    "AccessDenied", "AccessDeniedException", "ExpiredToken", "OptInRequired",
    "InvalidAccessKeyId", "IncompleteSignature", "MissingAuthenticationToken",
})
NOT_FOUND_CODES = frozenset({
    "InvalidInstanceID.NotFound", "InvalidVolume.NotFound", "InvalidSnapshot.NotFound",
    "InvalidAMIID.NotFound", "InvalidAMIID.Unavailable", "NoSuchKey", "NotFound", "404",
    "InvalidInstanceID.Malformed",
})
# botocore exceptions raised before any HTTP answer: network trouble is transient,
# missing local configuration is not.
TRANSIENT_EXCEPTIONS = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                        "ConnectionClosedError", "ConnectionError", "HTTPClientError",
                        "ProxyConnectionError")
PERMANENT_EXCEPTIONS = ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound",
                        "NoRegionError", "ParamValidationError", "UnknownServiceError",
                        "InvalidRegionError")


def error_code(exc):
    """(code, HTTP status) of a botocore ClientError, (None, None) for anything else."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, None
    code = (response.get("Error") or {}).get("Code")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code, status


def error_message(exc):
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        message = (response.get("Error") or {}).get("Message")
        if message:
            return message.strip().splitlines()[0]
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def translate_error(exc, what, missing_ok=False):
    """Our error class for a boto3/botocore exception, with ``what`` (provider, node, call) as
    the subject.  ``missing_ok``: a not-found answer becomes ``InstanceNotFound`` (deletes and
    lookups); otherwise it is permanent."""
    if isinstance(exc, CloudError):
        return exc
    code, status = error_code(exc)
    message = error_message(exc)
    name = type(exc).__name__
    if code is None:
        if name in TRANSIENT_EXCEPTIONS or isinstance(exc, (ConnectionError, TimeoutError)):
            return TransientCloudError(f"{what}: API unreachable: {message}")
        if name in PERMANENT_EXCEPTIONS:
            return PermanentCloudError(f"{what}: {message}")
        return TransientCloudError(f"{what}: {name}: {message}")
    if code in QUOTA_CODES:
        return QuotaError(f"{what}: {code}: {message}")
    if code in THROTTLE_CODES or (status is not None and status >= 500) or status == 429:
        return TransientCloudError(f"{what}: {code} ({status}): {message}")
    if code in AUTH_CODES:
        return PermanentCloudError(f"{what}: not authorised ({code}; check the AWS "
                                   f"credentials and profile): {message}")
    if code in NOT_FOUND_CODES or code.endswith(".NotFound"):
        if missing_ok:
            return InstanceNotFound(f"{what}: not found: {message}")
        return PermanentCloudError(f"{what}: {code}: {message}")
    if code.startswith("InvalidAMIID"):
        return PermanentCloudError(f"{what}: image refused ({code}): {message}")
    return PermanentCloudError(f"{what}: API refused ({code}): {message}")


def is_retryable(error):
    """Whether the adapter should try the same call again (throttling, 5xx, network)."""
    return isinstance(error, TransientCloudError)
