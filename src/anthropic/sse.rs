//! Incremental server-sent events: byte chunks in (split anywhere, even inside a CRLF or a
//! UTF-8 character), events out.
//!
//! Two layers: [`SseParser`] speaks the SSE wire format (fields, comments, LF / CR / CRLF line
//! ends, multi-line `data`), and [`MessageStreamDecoder`] reads the Messages API's events on
//! top of it: `ping` and unknown event types are passed on for a proxy to forward, an `error`
//! event after the 200 ends the stream with [`StreamError::Upstream`], and a stream that ends
//! without `message_stop` is reported [`StreamError::Truncated`].

use serde_json::Value;

use super::types::{ErrorBody, MessagesResponse};

/// The default bound on one line or one event's data: 16 MiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field (`message` when absent).
    pub event: String,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// The SSE wire format could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SseError {
    /// A line or an event's data passed the parser's bound.
    #[error("event larger than {0} bytes")]
    TooLarge(usize),
}

/// The SSE wire format, incrementally.
#[derive(Debug)]
pub struct SseParser {
    line: Vec<u8>,
    event: String,
    data: String,
    skip_lf: bool,
    max: usize,
    bytes_seen: bool,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new()
    }
}

impl SseParser {
    /// A parser bounding each event to [`DEFAULT_MAX_EVENT_BYTES`].
    pub fn new() -> Self {
        Self::with_max_event_bytes(DEFAULT_MAX_EVENT_BYTES)
    }

    /// A parser bounding each line and each event's data to `max` bytes.
    pub fn with_max_event_bytes(max: usize) -> Self {
        SseParser {
            line: Vec::new(),
            event: String::new(),
            data: String::new(),
            skip_lf: false,
            max,
            bytes_seen: false,
        }
    }

    /// Feeds one chunk; complete events are appended to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        let mut rest = chunk;
        if !self.bytes_seen && !rest.is_empty() {
            self.bytes_seen = true;
            rest = rest.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(rest);
        }
        for &b in rest {
            if std::mem::take(&mut self.skip_lf) && b == b'\n' {
                continue;
            }
            match b {
                b'\n' | b'\r' => {
                    self.skip_lf = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    self.line_done(&line, out)?;
                    self.line = line;
                    self.line.clear();
                }
                _ => {
                    if self.line.len() >= self.max {
                        return Err(SseError::TooLarge(self.max));
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(())
    }

    /// Whether a partial line or an undispatched event is buffered (the stream stopped in the
    /// middle of an event).
    pub fn has_partial(&self) -> bool {
        !self.line.is_empty() || !self.data.is_empty() || !self.event.is_empty()
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if line.is_empty() {
            let data = std::mem::take(&mut self.data);
            let event = std::mem::take(&mut self.event);
            if !data.is_empty() {
                let data = data.strip_suffix('\n').unwrap_or(&data).to_owned();
                let event = if event.is_empty() {
                    "message".to_owned()
                } else {
                    event
                };
                out.push(SseEvent { event, data });
            }
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.find(':') {
            Some(i) => {
                let v = &text[i + 1..];
                (&text[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (&text[..], ""),
        };
        match field {
            "event" => value.clone_into(&mut self.event),
            "data" => {
                if self.data.len() + value.len() + 1 > self.max {
                    return Err(SseError::TooLarge(self.max));
                }
                self.data.push_str(value);
                self.data.push('\n');
            }
            // `id`, `retry` and unknown fields mean nothing to the Messages API.
            _ => {}
        }
        Ok(())
    }
}

/// What a Messages API event is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// `message_start`.
    MessageStart,
    /// `content_block_start`.
    ContentBlockStart,
    /// `content_block_delta`.
    ContentBlockDelta,
    /// `content_block_stop`.
    ContentBlockStop,
    /// `message_delta`.
    MessageDelta,
    /// `message_stop`.
    MessageStop,
    /// `ping`.
    Ping,
    /// Any other type (tolerated, passed on).
    Unknown(String),
}

impl EventKind {
    fn of(name: &str) -> Self {
        match name {
            "message_start" => EventKind::MessageStart,
            "content_block_start" => EventKind::ContentBlockStart,
            "content_block_delta" => EventKind::ContentBlockDelta,
            "content_block_stop" => EventKind::ContentBlockStop,
            "message_delta" => EventKind::MessageDelta,
            "message_stop" => EventKind::MessageStop,
            "ping" => EventKind::Ping,
            other => EventKind::Unknown(other.to_owned()),
        }
    }
}

/// One Messages API event: its kind, its data as JSON, and the event as it came (for a proxy
/// to forward byte for byte).
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    /// What it is.
    pub kind: EventKind,
    /// The data, parsed (`Value::Null` for an unknown event whose data is not JSON).
    pub data: Value,
    /// The event as it came.
    pub raw: SseEvent,
}

impl StreamEvent {
    /// For `message_start`: the message (id, model, usage).
    pub fn message(&self) -> Option<MessagesResponse> {
        serde_json::from_value(self.data.get("message")?.clone()).ok()
    }

    /// For `content_block_delta` of a text block: the text.
    pub fn text_delta(&self) -> Option<&str> {
        self.data.get("delta")?.get("text")?.as_str()
    }
}

/// A Messages API stream that did not end well.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// An `error` event: the upstream failed after the 200 (e.g. `overloaded_error`).
    #[error("error event in stream: {}: {}", .0.error.error_type, .0.error.message)]
    Upstream(Box<ErrorBody>),
    /// The stream ended (or was cut) before `message_stop`.
    #[error("stream ended before message_stop")]
    Truncated,
    /// A known event whose data is not the JSON it should be, or an SSE line past the bound.
    #[error("invalid stream: {0}")]
    Invalid(String),
}

/// The Messages API's events over [`SseParser`], with the checks a caller needs: an error
/// event after the 200, events after `message_stop`, truncation.
#[derive(Debug, Default)]
pub struct MessageStreamDecoder {
    parser: SseParser,
    started: bool,
    stopped: bool,
    failed: bool,
    raw: Vec<SseEvent>,
}

impl MessageStreamDecoder {
    /// A decoder with the default event bound.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `message_start` was seen.
    pub fn started(&self) -> bool {
        self.started
    }

    /// Whether `message_stop` was seen (the stream is complete).
    pub fn finished(&self) -> bool {
        self.stopped
    }

    /// Feeds one chunk; complete events are appended to `out`. After an error, every call
    /// returns the same kind of error without reading more.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<StreamEvent>) -> Result<(), StreamError> {
        if self.failed {
            return Err(StreamError::Invalid("stream already failed".to_owned()));
        }
        let mut raw = std::mem::take(&mut self.raw);
        let result = self.decode(chunk, &mut raw, out);
        raw.clear();
        self.raw = raw;
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn decode(
        &mut self,
        chunk: &[u8],
        raw: &mut Vec<SseEvent>,
        out: &mut Vec<StreamEvent>,
    ) -> Result<(), StreamError> {
        self.parser
            .push(chunk, raw)
            .map_err(|e| StreamError::Invalid(e.to_string()))?;
        for ev in raw.drain(..) {
            if ev.event == "error" {
                let body = serde_json::from_str::<ErrorBody>(&ev.data).map_err(|_| {
                    StreamError::Invalid(format!(
                        "error event with unreadable data: {}",
                        cut(&ev.data)
                    ))
                })?;
                return Err(StreamError::Upstream(Box::new(body)));
            }
            let kind = EventKind::of(&ev.event);
            let data = match serde_json::from_str::<Value>(&ev.data) {
                Ok(v) => v,
                Err(_) if matches!(kind, EventKind::Unknown(_)) => Value::Null,
                Err(e) => {
                    return Err(StreamError::Invalid(format!(
                        "{} data is not JSON ({e}): {}",
                        ev.event,
                        cut(&ev.data)
                    )))
                }
            };
            match kind {
                EventKind::MessageStart => self.started = true,
                EventKind::MessageStop => self.stopped = true,
                _ => {}
            }
            out.push(StreamEvent {
                kind,
                data,
                raw: ev,
            });
        }
        Ok(())
    }

    /// The stream's body ended: an error unless `message_stop` was seen.
    pub fn finish(&self) -> Result<(), StreamError> {
        if self.stopped {
            Ok(())
        } else {
            Err(StreamError::Truncated)
        }
    }
}

fn cut(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HAPPY: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"m\",\"content\":[],\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n\
event: ping\ndata: {\"type\": \"ping\"}\n\n\
: a comment\n\n\
event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Héllo\"}}\n\n\
event: brand_new_event\ndata: not json at all\n\n\
event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

    fn decode_in_chunks(
        text: &[u8],
        cuts: &[usize],
    ) -> (Vec<StreamEvent>, Result<(), StreamError>, bool) {
        let mut d = MessageStreamDecoder::new();
        let mut out = Vec::new();
        let mut at = 0;
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (text.len() + 1)).collect();
        points.sort_unstable();
        points.push(text.len());
        for p in points {
            if let Err(e) = d.push(&text[at..p], &mut out) {
                return (out, Err(e), false);
            }
            at = p;
        }
        let fin = d.finish();
        (out, fin, d.started())
    }

    fn kinds(events: &[StreamEvent]) -> Vec<EventKind> {
        events.iter().map(|e| e.kind.clone()).collect()
    }

    #[test]
    fn a_whole_stream_reads_as_the_api_sends_it() {
        let (events, fin, started) = decode_in_chunks(HAPPY.as_bytes(), &[]);
        assert_eq!(fin, Ok(()));
        assert!(started);
        assert_eq!(
            kinds(&events),
            [
                EventKind::MessageStart,
                EventKind::Ping,
                EventKind::ContentBlockStart,
                EventKind::ContentBlockDelta,
                EventKind::Unknown("brand_new_event".into()),
                EventKind::ContentBlockStop,
                EventKind::MessageDelta,
                EventKind::MessageStop,
            ]
        );
        assert_eq!(events[3].text_delta(), Some("Héllo"));
        assert_eq!(events[4].data, Value::Null);
        assert_eq!(events[4].raw.data, "not json at all");
        let m = events[0].message().expect("message_start has a message");
        assert_eq!((m.id.as_str(), m.usage.input_tokens), ("msg_1", 3));
    }

    #[test]
    fn crlf_and_cr_line_ends_read_like_lf() {
        let crlf = HAPPY.replace('\n', "\r\n");
        let cr = HAPPY.replace('\n', "\r");
        let (a, _, _) = decode_in_chunks(HAPPY.as_bytes(), &[]);
        for text in [crlf, cr] {
            // Cut between every \r and \n too.
            let cuts: Vec<usize> = (0..text.len()).step_by(7).collect();
            let (b, fin, _) = decode_in_chunks(text.as_bytes(), &cuts);
            assert_eq!(fin, Ok(()));
            assert_eq!(kinds(&a), kinds(&b));
            assert_eq!(
                a.iter().map(|e| &e.data).collect::<Vec<_>>(),
                b.iter().map(|e| &e.data).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn an_error_event_after_the_200_ends_the_stream() {
        let text = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{}}\n\n\
event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n";
        let (events, fin, _) = decode_in_chunks(text.as_bytes(), &[5, 60]);
        assert_eq!(kinds(&events), [EventKind::MessageStart]);
        match fin {
            Err(StreamError::Upstream(b)) => assert_eq!(b.error.error_type, "overloaded_error"),
            other => panic!("expected the error event, got {other:?}"),
        }
    }

    #[test]
    fn truncated_streams_are_reported() {
        let cut_at = HAPPY.find("event: message_stop").expect("has message_stop");
        let (_, fin, started) = decode_in_chunks(&HAPPY.as_bytes()[..cut_at], &[]);
        assert!(started);
        assert_eq!(fin, Err(StreamError::Truncated));
        let (events, fin, _) = decode_in_chunks(b"", &[]);
        assert!(events.is_empty());
        assert_eq!(fin, Err(StreamError::Truncated));
    }

    #[test]
    fn garbage_in_a_known_event_is_invalid_not_a_panic() {
        let (_, fin, _) = decode_in_chunks(b"event: message_start\ndata: {oops\n\n", &[]);
        assert!(matches!(fin, Err(StreamError::Invalid(_))), "{fin:?}");
        let (_, fin, _) = decode_in_chunks(b"event: error\ndata: <html>\n\n", &[]);
        assert!(matches!(fin, Err(StreamError::Invalid(_))), "{fin:?}");
    }

    #[test]
    fn multi_line_data_and_field_forms_follow_the_sse_rules() {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        p.push(
            b"\xEF\xBB\xBFdata: a\ndata:b\ndata\nid: 7\nretry: 10\n\nevent: x\n\nevent:y\ndata:  z\n\n",
            &mut out,
        )
        .expect("parses");
        assert_eq!(
            out,
            [
                SseEvent {
                    event: "message".into(),
                    data: "a\nb\n".into()
                },
                SseEvent {
                    event: "y".into(),
                    data: " z".into()
                },
            ]
        );
        assert!(!p.has_partial());
        p.push(b"data: half", &mut out).expect("parses");
        assert!(p.has_partial());
    }

    #[test]
    fn an_endless_line_is_bounded() {
        let mut p = SseParser::with_max_event_bytes(100);
        let mut out = Vec::new();
        assert_eq!(p.push(&[b'a'; 101], &mut out), Err(SseError::TooLarge(100)));
        let mut p = SseParser::with_max_event_bytes(100);
        let many = "data: 0123456789\n".repeat(10);
        assert_eq!(
            p.push(many.as_bytes(), &mut out),
            Err(SseError::TooLarge(100))
        );
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_events(cuts in proptest::collection::vec(0usize..5000, 0..40),
                                               crlf in any::<bool>()) {
            let text = if crlf { HAPPY.replace('\n', "\r\n") } else { HAPPY.to_owned() };
            let (whole, _, _) = decode_in_chunks(text.as_bytes(), &[]);
            let (parts, fin, _) = decode_in_chunks(text.as_bytes(), &cuts);
            prop_assert_eq!(fin, Ok(()));
            prop_assert_eq!(whole, parts);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000),
                                       cuts in proptest::collection::vec(0usize..2000, 0..10)) {
            let _ = decode_in_chunks(&bytes, &cuts);
            let mut p = SseParser::with_max_event_bytes(64);
            let mut out = Vec::new();
            let _ = p.push(&bytes, &mut out);
        }
    }
}
