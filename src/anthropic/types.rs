//! Messages API bodies: the fields fusebox reads are typed, everything else rides in a
//! flattened map and is written back exactly as it came (tools, system, thinking, metadata,
//! fields added to the API later).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A `POST /v1/messages` request body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessagesRequest {
    /// The model to call (each target of a chain sets its own).
    pub model: String,
    /// The most tokens the answer may have.
    pub max_tokens: u64,
    /// Whether the answer comes as a server-sent event stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Every other field (`messages`, `system`, `tools`, `thinking`, `metadata`...), untouched.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

impl MessagesRequest {
    /// A request for `model` with `max_tokens` and nothing else yet.
    pub fn new(model: impl Into<String>, max_tokens: u64) -> Self {
        MessagesRequest {
            model: model.into(),
            max_tokens,
            stream: None,
            rest: Map::new(),
        }
    }

    /// With `field` set to `value` (e.g. `messages`, `system`).
    pub fn with(mut self, field: impl Into<String>, value: Value) -> Self {
        self.rest.insert(field.into(), value);
        self
    }

    /// A request with one user message of plain text.
    pub fn user_text(model: impl Into<String>, max_tokens: u64, text: &str) -> Self {
        Self::new(model, max_tokens).with(
            "messages",
            serde_json::json!([{"role": "user", "content": text}]),
        )
    }

    /// Whether the request asks for a stream.
    pub fn is_stream(&self) -> bool {
        self.stream == Some(true)
    }
}

/// Token counts of an answer. Other counters (`cache_read_input_tokens`...) pass through.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Input tokens billed.
    #[serde(default)]
    pub input_tokens: u64,
    /// Output tokens billed.
    #[serde(default)]
    pub output_tokens: u64,
    /// Every other field, untouched.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// A `POST /v1/messages` answer (non-streaming), or the `message` of a `message_start` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessagesResponse {
    /// The message id (`msg_...`).
    pub id: String,
    /// The model that answered.
    pub model: String,
    /// Why generation stopped (`end_turn`, `max_tokens`, `tool_use`...).
    #[serde(default)]
    pub stop_reason: Option<String>,
    /// Token counts.
    #[serde(default)]
    pub usage: Usage,
    /// The content blocks, untouched.
    #[serde(default)]
    pub content: Vec<Value>,
    /// Every other field (`type`, `role`, `stop_sequence`...), untouched.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

impl MessagesResponse {
    /// The text of every `text` content block, joined.
    pub fn text(&self) -> String {
        self.content
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect()
    }
}

/// An error body: `{"type":"error","error":{"type":...,"message":...},"request_id":...}`.
/// Also the data of an `error` event inside a stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// `"error"`.
    #[serde(rename = "type", default = "error_literal")]
    pub kind: String,
    /// What went wrong.
    pub error: ApiError,
    /// The request's id, when the API gives it in the body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

fn error_literal() -> String {
    "error".to_owned()
}

/// The `error` object of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// The error type (`rate_limit_error`, `overloaded_error`...). The set can grow.
    #[serde(rename = "type")]
    pub error_type: String,
    /// A human-readable message.
    #[serde(default)]
    pub message: String,
    /// Details, such as `{"error_code": "enforced_spend_limit_reached"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
    /// Every other field, untouched.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

impl ApiError {
    /// `details.error_code`, when present.
    pub fn error_code(&self) -> Option<&str> {
        self.details.as_ref()?.get("error_code")?.as_str()
    }
}

impl ErrorBody {
    /// Reads an error body; `None` when it is not one (garbage, HTML from a load balancer).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_request_fields_pass_through_untouched() {
        let body = json!({
            "model": "claude-sonnet-4-6",
            "max_tokens": 1024,
            "stream": true,
            "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "thinking": {"type": "enabled", "budget_tokens": 2048},
            "metadata": {"user_id": "u-1"},
            "messages": [{"role": "user", "content": "hi"}],
            "a_field_from_the_future": {"nested": [1, 2.5, null, "x"]}
        });
        let req: MessagesRequest = serde_json::from_value(body.clone()).expect("parses");
        assert_eq!(req.model, "claude-sonnet-4-6");
        assert_eq!(req.max_tokens, 1024);
        assert!(req.is_stream());
        assert_eq!(serde_json::to_value(&req).expect("serializes"), body);
    }

    #[test]
    fn a_request_without_model_or_max_tokens_is_an_error_not_a_panic() {
        assert!(serde_json::from_value::<MessagesRequest>(json!({"model": "m"})).is_err());
        assert!(serde_json::from_str::<MessagesRequest>("{not json").is_err());
        assert!(
            serde_json::from_value::<MessagesRequest>(json!({"model": "m", "max_tokens": -1}))
                .is_err()
        );
    }

    #[test]
    fn responses_keep_content_and_unknown_fields() {
        let body = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
            "content": [{"type": "text", "text": "Hello"}, {"type": "tool_use", "id": "t", "name": "n", "input": {}}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 3, "output_tokens": 5, "cache_read_input_tokens": 0}
        });
        let r: MessagesResponse = serde_json::from_value(body.clone()).expect("parses");
        assert_eq!(r.usage.output_tokens, 5);
        assert_eq!(r.stop_reason.as_deref(), Some("end_turn"));
        assert_eq!(r.text(), "Hello");
        assert_eq!(serde_json::to_value(&r).expect("serializes"), body);
    }

    #[test]
    fn error_bodies_expose_type_code_and_request_id() {
        let raw = br#"{"type":"error","error":{"type":"rate_limit_error","message":"cap","details":{"error_code":"enforced_spend_limit_reached"}},"request_id":"req_9"}"#;
        let e = ErrorBody::parse(raw).expect("an error body");
        assert_eq!(e.error.error_type, "rate_limit_error");
        assert_eq!(e.error.error_code(), Some("enforced_spend_limit_reached"));
        assert_eq!(e.request_id.as_deref(), Some("req_9"));
        assert_eq!(ErrorBody::parse(b"<html>502 Bad Gateway</html>"), None);
        assert_eq!(
            ErrorBody::parse(br#"{"error":{"type":"x"}}"#).map(|e| e.kind),
            Some("error".into())
        );
    }
}
