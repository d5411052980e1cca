//! The Anthropic Messages API (feature `client`): request and response types that read the
//! fields fusebox needs and pass every other field through untouched, the response headers
//! fusebox reads, and the incremental SSE parser.

pub mod headers;
pub mod sse;
mod types;

pub use headers::{
    parse_retry_after, parse_retry_after_ms, parse_rfc3339, HeaderError, HeaderProblem, RateLimit,
    RateLimits, ResponseHeaders, RETRY_AFTER_CEILING,
};
pub use sse::{EventKind, MessageStreamDecoder, SseEvent, SseParser, StreamError, StreamEvent};
pub use types::{ApiError, ErrorBody, MessagesRequest, MessagesResponse, Usage};
