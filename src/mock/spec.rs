//! [`PlanSpec`]: a plan as plain data (the `/_mock/` control API's JSON body and the
//! `fusebox mock-upstream` flags), checked and turned into a [`Plan`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Plan, Reply};

/// How one model is answered, as plain data. Every field is optional; `{}` is a model that
/// answers every request.
///
/// - `status` alone: every request gets this error status (a real error body of the type
///   the API gives it). With `failure_rate`: the failing share gets it.
/// - `failure_rate` (0.0 to 1.0): the share of requests that fail (seeded draws), with
///   `status` (default 529) or the mid-stream error.
/// - `latency_ms`: a wait before each answer.
/// - `retry_after`: the `retry-after` header of every error (seconds, or an HTTP date).
/// - `mid_stream_error`: failures of streaming requests become a 200 with `message_start`
///   then an SSE `error` event; `true` takes the error type of `status` (default 529:
///   `overloaded_error`), a string names the type. A non-streaming request gets the status
///   of that type, as the API does.
/// - `text`: the text of a normal answer (default: `"<model> says: <last user text>"`).
///
/// ```
/// use fusebox::mock::PlanSpec;
///
/// let spec: PlanSpec = serde_json::from_str(r#"{"status": 529, "failure_rate": 0.3}"#).unwrap();
/// assert!(spec.to_plan().is_ok());
/// let bad: PlanSpec = serde_json::from_str(r#"{"failure_rate": 3}"#).unwrap();
/// assert!(bad.to_plan().unwrap_err().contains("failure_rate"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    /// The error status (400 to 599) of every answer, or of the failing share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The share of requests that fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<f64>,
    /// The wait before each answer, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// The `retry-after` header of the errors, as written (`"5"`, or a number).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "string_or_number"
    )]
    pub retry_after: Option<String>,
    /// Failures of streams come after the 200: `true` (written as an empty string here), or
    /// the error type.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "bool_or_string",
        serialize_with = "true_or_string"
    )]
    pub mid_stream_error: Option<String>,
    /// The text of a normal answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// `mid_stream_error: true`: the error type follows the status.
const FROM_STATUS: &str = "";

fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum V {
        S(String),
        N(u64),
    }
    Ok(Option::<V>::deserialize(d)?.map(|v| match v {
        V::S(s) => s,
        V::N(n) => n.to_string(),
    }))
}

fn true_or_string<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v.as_deref() {
        Some(FROM_STATUS) => s.serialize_bool(true),
        Some(t) => s.serialize_str(t),
        None => s.serialize_none(),
    }
}

fn bool_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum V {
        B(bool),
        S(String),
    }
    Ok(match Option::<V>::deserialize(d)? {
        None | Some(V::B(false)) => None,
        Some(V::B(true)) => Some(FROM_STATUS.to_owned()),
        Some(V::S(s)) => Some(s),
    })
}

/// The longest `latency_ms` (an hour: a client's timeout ends it long before).
const MAX_LATENCY_MS: u64 = 3_600_000;

impl PlanSpec {
    /// The plan, or a message naming the field that is wrong.
    pub fn to_plan(&self) -> Result<Plan, String> {
        if let Some(s) = self.status {
            if !(400..=599).contains(&s) {
                return Err(format!(
                    "status: {s} is not an error status (400 to 599); leave it out for answers"
                ));
            }
        }
        if let Some(r) = self.failure_rate {
            if !(0.0..=1.0).contains(&r) {
                return Err(format!("failure_rate: {r} is not between 0.0 and 1.0"));
            }
        }
        let latency = self.latency_ms.unwrap_or(0);
        if latency > MAX_LATENCY_MS {
            return Err(format!(
                "latency_ms: {latency} is more than an hour ({MAX_LATENCY_MS})"
            ));
        }
        if let Some(ra) = &self.retry_after {
            if http::HeaderValue::from_str(ra).is_err() || ra.is_empty() {
                return Err(format!("retry_after: {ra:?} is not a header value"));
            }
        }
        if let Some(t) = &self.mid_stream_error {
            if !t.is_empty() && !t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!(
                    "mid_stream_error: {t:?} is not an error type (such as overloaded_error)"
                ));
            }
        }
        let fails = self.status.is_some() || self.mid_stream_error.is_some();
        if self.retry_after.is_some() && !fails && self.failure_rate.is_none() {
            return Err(
                "retry_after: only errors carry it; give status, failure_rate or mid_stream_error"
                    .to_owned(),
            );
        }
        let status = self.status.unwrap_or(529);
        let failure = match &self.mid_stream_error {
            Some(t) if t == FROM_STATUS => {
                Reply::error_after_start(super::reply::error_type_of(status))
            }
            Some(t) => Reply::error_after_start(t),
            None => match &self.retry_after {
                Some(ra) => Reply::status(status).retry_after(ra.clone()),
                None => Reply::status(status),
            },
        };
        let mut plan = match self.failure_rate {
            Some(rate) => Plan::answer().failing(rate, failure),
            None if fails => Plan::always(failure),
            None => Plan::answer(),
        };
        plan.latency = Duration::from_millis(latency);
        plan.text.clone_from(&self.text);
        Ok(plan)
    }
}
