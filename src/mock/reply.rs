//! What the fake upstream answers, and the wire format of each answer.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};

/// One answer of the fake upstream.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub enum Reply {
    /// A normal answer: a JSON message, or an SSE stream when the request asked for one. Its
    /// text is `"<model> says: <last user text>"`.
    #[default]
    Answer,
    /// An error status with a real JSON error body and headers.
    Error(ErrorReply),
    /// A stream that starts with a 200 and `message_start`, then sends an `error` event
    /// (`error_type`, e.g. `overloaded_error`). A non-streaming request gets the error as a
    /// status instead, as the API does.
    ErrorAfterStart {
        /// The event's `error.type`.
        error_type: String,
    },
    /// A 200 whose body stops half-way and whose connection is then dropped.
    DropMidBody,
    /// A 200 whose body is not JSON (or, for a stream, an event whose data is not JSON).
    Garbage,
    /// A stream that ends cleanly before `message_stop` (for a non-streaming request: a JSON
    /// body cut short, with a clean end).
    Truncated,
    /// No answer at all (the client's timeout ends it).
    Hang,
    /// A stream that sends its 200 and `message_start`, then nothing more (a non-streaming
    /// request gets no answer at all).
    StallMidStream,
    /// Exactly this status, headers and body.
    Raw {
        /// The status.
        status: u16,
        /// The headers.
        headers: Vec<(String, String)>,
        /// The body.
        body: String,
    },
}

/// An error answer: status, JSON error body, and the headers a client reads.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorReply {
    /// The status.
    pub status: u16,
    /// The body's `error.type`.
    pub error_type: String,
    /// The body's `error.message`.
    pub message: String,
    /// The body's `error.details`.
    pub details: Option<Value>,
    /// A `retry-after` header, as written.
    pub retry_after: Option<String>,
    /// A `retry-after-ms` header, as written.
    pub retry_after_ms: Option<String>,
    /// An `x-should-retry` header.
    pub should_retry: Option<bool>,
}

/// The error type the API gives a status.
pub(crate) fn error_type_of(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        409 => "conflict_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

impl Reply {
    /// An error with `status` and the API's error type for it.
    pub fn status(status: u16) -> Reply {
        Reply::Error(ErrorReply {
            status,
            error_type: error_type_of(status).to_owned(),
            message: format!("mock {} ({status})", error_type_of(status)),
            details: None,
            retry_after: None,
            retry_after_ms: None,
            should_retry: None,
        })
    }

    /// The error message of an error reply (empty for others).
    pub(crate) fn message(&self) -> &str {
        match self {
            Reply::Error(e) => &e.message,
            _ => "",
        }
    }

    /// 529 `overloaded_error`.
    pub fn overloaded() -> Reply {
        Reply::status(529)
    }

    /// 429 `rate_limit_error` with `retry-after: <secs>`.
    pub fn rate_limited(secs: u64) -> Reply {
        Reply::status(429).retry_after(secs.to_string())
    }

    /// The spend-cap 429: `error.details.error_code = "enforced_spend_limit_reached"`, no
    /// `retry-after`.
    pub fn spend_cap() -> Reply {
        Reply::status(429).details(json!({"error_code": "enforced_spend_limit_reached"}))
    }

    /// A 400 saying the prompt does not fit the context window.
    pub fn prompt_too_long() -> Reply {
        Reply::Error(ErrorReply {
            message: "prompt is too long: 215000 tokens > 200000 maximum".to_owned(),
            ..Reply::status(400).into_error()
        })
    }

    /// An `error` event of type `error_type` after the 200.
    pub fn error_after_start(error_type: &str) -> Reply {
        Reply::ErrorAfterStart {
            error_type: error_type.to_owned(),
        }
    }

    fn into_error(self) -> ErrorReply {
        match self {
            Reply::Error(e) => e,
            _ => match Reply::status(500) {
                Reply::Error(e) => e,
                _ => unreachable!("Reply::status builds an error"),
            },
        }
    }

    fn map_error(self, f: impl FnOnce(&mut ErrorReply)) -> Reply {
        match self {
            Reply::Error(mut e) => {
                f(&mut e);
                Reply::Error(e)
            }
            other => other,
        }
    }

    /// With a `retry-after` header (an error only).
    pub fn retry_after(self, value: impl Into<String>) -> Reply {
        let v = value.into();
        self.map_error(|e| e.retry_after = Some(v))
    }

    /// With a `retry-after-ms` header (an error only).
    pub fn retry_after_ms(self, value: impl Into<String>) -> Reply {
        let v = value.into();
        self.map_error(|e| e.retry_after_ms = Some(v))
    }

    /// With `error.details` (an error only).
    pub fn details(self, details: Value) -> Reply {
        self.map_error(|e| e.details = Some(details))
    }

    /// With an `x-should-retry` header (an error only).
    pub fn should_retry(self, yes: bool) -> Reply {
        self.map_error(|e| e.should_retry = Some(yes))
    }
}

/// What a request said that an answer echoes.
#[derive(Debug, Clone)]
pub(crate) struct Asked {
    pub(crate) model: String,
    pub(crate) stream: bool,
    pub(crate) text: String,
    pub(crate) input_tokens: u64,
    /// The plan's answer text, instead of the echo.
    pub(crate) answer: Option<String>,
}

impl Asked {
    pub(crate) fn from_body(body: &Value) -> Asked {
        let model = body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
        let last = body
            .get("messages")
            .and_then(Value::as_array)
            .and_then(|m| m.last())
            .and_then(|m| m.get("content"));
        let text = match last {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(blocks)) => blocks
                .iter()
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect(),
            _ => String::new(),
        };
        let input_tokens = (text.split_whitespace().count() as u64).max(1);
        Asked {
            model,
            stream,
            text,
            input_tokens,
            answer: None,
        }
    }

    pub(crate) fn answer_text(&self) -> String {
        match &self.answer {
            Some(text) => text.clone(),
            None => format!("{} says: {}", self.model, self.text),
        }
    }

    pub(crate) fn message(&self, id: &str) -> Value {
        let text = self.answer_text();
        json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": output_tokens(&text)}
        })
    }

    /// The SSE events of a whole answer, one chunk per event.
    pub(crate) fn events(&self, id: &str) -> Vec<Bytes> {
        let text = self.answer_text();
        let mid = text
            .char_indices()
            .map(|(i, _)| i)
            .nth(text.chars().count() / 2)
            .unwrap_or(text.len());
        let (a, b) = text.split_at(mid);
        vec![
            self.message_start(id),
            event(
                "content_block_start",
                &json!({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}}),
            ),
            event("ping", &json!({"type": "ping"})),
            delta(a),
            delta(b),
            event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": 0}),
            ),
            event(
                "message_delta",
                &json!({"type": "message_delta",
                        "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                        "usage": {"output_tokens": output_tokens(&text)}}),
            ),
            event("message_stop", &json!({"type": "message_stop"})),
        ]
    }

    pub(crate) fn message_start(&self, id: &str) -> Bytes {
        event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": self.input_tokens, "output_tokens": 1}}}),
        )
    }
}

fn output_tokens(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

fn delta(text: &str) -> Bytes {
    event(
        "content_block_delta",
        &json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": text}}),
    )
}

/// One SSE event as the API writes it.
pub(crate) fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// The JSON error body of `e`.
pub(crate) fn error_body(
    error_type: &str,
    message: &str,
    details: Option<&Value>,
    request_id: &str,
) -> Value {
    let mut error = json!({"type": error_type, "message": message});
    if let (Some(d), Some(obj)) = (details, error.as_object_mut()) {
        obj.insert("details".to_owned(), d.clone());
    }
    json!({"type": "error", "error": error, "request_id": request_id})
}

/// How long a [`Reply::Hang`] waits before giving up on its own (a client normally ends it
/// much sooner).
pub(crate) const HANG: Duration = Duration::from_secs(3600);
