//! The Anthropic Messages API (feature `client`): request and response types that read the
//! fields fusebox needs and pass every other field through untouched, the response headers
//! fusebox reads, the incremental SSE parser, and a reqwest (rustls) client whose errors are
//! classified by [`crate::classify`].

mod client;
pub(crate) mod gathered;
mod guarded;
pub mod headers;
pub mod sse;
mod types;

/// The error of every call of this module (also at the crate root, `fusebox::UpstreamError`).
pub use crate::error::{UpstreamError, UpstreamErrorKind};
pub use client::{
    ApiKey, Client, ClientBuilder, MessageStream, Reply, DEFAULT_BASE_URL, DEFAULT_TIMEOUT,
    DEFAULT_VERSION,
};
pub use guarded::{Guarded, GuardedReply, GuardedStream};
pub use headers::{
    parse_retry_after, parse_retry_after_ms, parse_rfc3339, HeaderError, HeaderProblem, RateLimit,
    RateLimits, ResponseHeaders, RETRY_AFTER_CEILING,
};
pub use sse::{EventKind, MessageStreamDecoder, SseEvent, SseParser, StreamError, StreamEvent};
pub use types::{ApiError, ErrorBody, MessagesRequest, MessagesResponse, Usage};
