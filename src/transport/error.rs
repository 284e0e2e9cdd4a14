//! RPC status codes and the error value every RPC handler returns.

use std::fmt;

/// The Connect / gRPC status codes (same set, same meaning in both protocols).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl Code {
    /// The Connect wire name (`"invalid_argument"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a Connect unary error with this code.
    pub fn http_status(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            Code::Canceled => S::from_u16(499).unwrap_or(S::REQUEST_TIMEOUT),
            Code::Unknown => S::INTERNAL_SERVER_ERROR,
            Code::InvalidArgument => S::BAD_REQUEST,
            Code::DeadlineExceeded => S::GATEWAY_TIMEOUT,
            Code::NotFound => S::NOT_FOUND,
            Code::AlreadyExists => S::CONFLICT,
            Code::PermissionDenied => S::FORBIDDEN,
            Code::ResourceExhausted => S::TOO_MANY_REQUESTS,
            Code::FailedPrecondition => S::BAD_REQUEST,
            Code::Aborted => S::CONFLICT,
            Code::OutOfRange => S::BAD_REQUEST,
            Code::Unimplemented => S::NOT_IMPLEMENTED,
            Code::Internal => S::INTERNAL_SERVER_ERROR,
            Code::Unavailable => S::SERVICE_UNAVAILABLE,
            Code::DataLoss => S::INTERNAL_SERVER_ERROR,
            Code::Unauthenticated => S::UNAUTHORIZED,
        }
    }

    /// The numeric gRPC status code.
    pub fn grpc_code(self) -> u32 {
        match self {
            Code::Canceled => 1,
            Code::Unknown => 2,
            Code::InvalidArgument => 3,
            Code::DeadlineExceeded => 4,
            Code::NotFound => 5,
            Code::AlreadyExists => 6,
            Code::PermissionDenied => 7,
            Code::ResourceExhausted => 8,
            Code::FailedPrecondition => 9,
            Code::Aborted => 10,
            Code::OutOfRange => 11,
            Code::Unimplemented => 12,
            Code::Internal => 13,
            Code::Unavailable => 14,
            Code::DataLoss => 15,
            Code::Unauthenticated => 16,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An RPC failure: a status code and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    pub fn unimplemented(message: impl Into<String>) -> Self {
        Self::new(Code::Unimplemented, message)
    }

    pub fn deadline_exceeded() -> Self {
        Self::new(Code::DeadlineExceeded, "the deadline of the call expired")
    }

    /// The Connect JSON error object: `{"code":"…","message":"…"}`.
    pub fn to_connect_json(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code.as_str(), "message": self.message })
    }
}
