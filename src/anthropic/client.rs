//! The Messages API client on reqwest (rustls): sends a request, returns the answer with its
//! parsed headers or an [`UpstreamError`] classified by the client's [`Policy`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};

use super::headers::ResponseHeaders;
use super::sse::{MessageStreamDecoder, StreamError, StreamEvent};
use super::types::{ErrorBody, MessagesRequest, MessagesResponse};
use crate::classify::{AnthropicPolicy, Policy};
use crate::error::{UpstreamError, UpstreamErrorKind};
use crate::Error;

/// The default base URL.
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
/// The default `anthropic-version` header.
pub const DEFAULT_VERSION: &str = "2023-06-01";
/// The default per-attempt timeout (the seed's 15 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// The most bytes of an error body read (a bigger one is cut there).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The API key header (a constant: not parsed per request).
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// An API key. Its `Debug` never shows it, and its header is marked sensitive (HTTP/2 never
/// indexes it, and `Debug` of the header map hides it).
#[derive(Clone)]
pub struct ApiKey(HeaderValue);

impl ApiKey {
    /// Wraps a key; an error when it cannot be a header value (control characters).
    pub fn new(key: &str) -> Result<Self, Error> {
        let mut v = HeaderValue::from_str(key)
            .map_err(|_| Error::config("api_key", "contains characters a header cannot carry"))?;
        v.set_sensitive(true);
        Ok(ApiKey(v))
    }
}

impl ApiKey {
    /// Wraps a header value as it came (the proxy's callers' keys), marked sensitive.
    #[cfg(feature = "proxy")]
    pub(crate) fn from_header(mut v: HeaderValue) -> Self {
        v.set_sensitive(true);
        ApiKey(v)
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// Builds a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    api_key: Option<ApiKey>,
    base_url: String,
    version: String,
    betas: Vec<String>,
    timeout: Duration,
    policy: Arc<dyn Policy>,
}

impl ClientBuilder {
    /// The API key sent as `x-api-key`. Default: none (a proxy passes the caller's key with
    /// [`Client::with_api_key`]).
    pub fn api_key(mut self, key: ApiKey) -> Self {
        self.api_key = Some(key);
        self
    }

    /// The base URL (`https://api.anthropic.com`, or a proxy, or a test server).
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = url.into();
        self
    }

    /// The `anthropic-version` header. Default: [`DEFAULT_VERSION`].
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Adds an `anthropic-beta` value (sent comma-separated).
    pub fn beta(mut self, beta: impl Into<String>) -> Self {
        self.betas.push(beta.into());
        self
    }

    /// The per-attempt timeout: for a plain request the whole answer; for a stream, until its
    /// headers arrive, and then the longest silence between two chunks (the API sends `ping`
    /// events, so a healthy stream is never silent that long). Default: [`DEFAULT_TIMEOUT`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The classification policy. Default: [`AnthropicPolicy`].
    pub fn policy(mut self, policy: Arc<dyn Policy>) -> Self {
        self.policy = policy;
        self
    }

    /// The client; an error names the field that is wrong.
    pub fn build(self) -> Result<Client, Error> {
        let base = self.base_url.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&format!("{base}/v1/messages"))
            .map_err(|e| Error::config("base_url", format!("{:?}: {e}", self.base_url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::config(
                "base_url",
                "must be an http:// or https:// URL",
            ));
        }
        if self.timeout.is_zero() {
            return Err(Error::config("timeout", "must be more than zero"));
        }
        let mut fixed = HeaderMap::new();
        let version = HeaderValue::from_str(&self.version)
            .map_err(|_| Error::config("version", "not a valid header value"))?;
        fixed.insert("anthropic-version", version);
        if !self.betas.is_empty() {
            let betas = HeaderValue::from_str(&self.betas.join(","))
                .map_err(|_| Error::config("beta", "not a valid header value"))?;
            fixed.insert("anthropic-beta", betas);
        }
        // Never follow a redirect: its `location` could name another host, and the request
        // carries the caller's `x-api-key` (reqwest strips only `authorization` across hosts).
        // A 3xx is the upstream's answer, classified like any other status.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .build()
            .map_err(|e| Error::config("client", e.to_string()))?;
        Ok(Client {
            http,
            shared: Arc::new(Shared {
                url,
                fixed,
                timeout: self.timeout,
                policy: self.policy,
            }),
            api_key: self.api_key,
            secret: None,
        })
    }
}

#[derive(Debug)]
struct Shared {
    url: reqwest::Url,
    fixed: HeaderMap,
    timeout: Duration,
    policy: Arc<dyn Policy>,
}

/// The largest plain answer read from the upstream: 64 MiB (a Messages answer of the
/// largest output is a few MB).
pub(crate) const MAX_REPLY_BYTES: usize = 64 * 1024 * 1024;

/// A Messages API client. Cheap to clone (one connection pool).
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    shared: Arc<Shared>,
    api_key: Option<ApiKey>,
    /// A credential sent some other way (the proxy forwards a client's `authorization`
    /// header), masked in error messages as the API key is.
    secret: Option<ApiKey>,
}

/// A successful non-streaming answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The HTTP status (2xx).
    pub status: u16,
    /// The answer.
    pub message: MessagesResponse,
    /// Its headers, parsed.
    pub headers: ResponseHeaders,
}

impl Client {
    /// A builder with the defaults.
    pub fn builder() -> ClientBuilder {
        ClientBuilder {
            api_key: None,
            base_url: DEFAULT_BASE_URL.to_owned(),
            version: DEFAULT_VERSION.to_owned(),
            betas: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            policy: Arc::new(AnthropicPolicy::new()),
        }
    }

    /// The same client (same pool) sending another key.
    pub fn with_api_key(&self, key: ApiKey) -> Client {
        Client {
            api_key: Some(key),
            ..self.clone()
        }
    }

    /// This client masking `secret` (a credential the caller sends in a header of its own,
    /// such as a bearer token) in error messages, as it masks its API key.
    #[cfg(feature = "proxy")]
    pub(crate) fn masking(&self, secret: ApiKey) -> Client {
        Client {
            secret: Some(secret),
            ..self.clone()
        }
    }

    /// The per-attempt timeout.
    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    fn request(&self, req: &MessagesRequest, stream: bool) -> reqwest::RequestBuilder {
        let mut headers = self.shared.fixed.clone();
        if let Some(key) = &self.api_key {
            headers.insert(X_API_KEY, key.0.clone());
        }
        let body = if req.is_stream() == stream {
            serde_json::to_vec(req)
        } else {
            let mut r = req.clone();
            r.stream = stream.then_some(true);
            serde_json::to_vec(&r)
        };
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        self.http
            .post(self.shared.url.clone())
            .headers(headers)
            .body(body.unwrap_or_default())
    }

    /// Sends raw body bytes (the proxy's path: the caller's JSON, forwarded as it came) to
    /// `url` with `headers` (the caller's `anthropic-version`, `anthropic-beta`,
    /// `authorization`) over the client's fixed ones, and this client's key. Returns once a
    /// 2xx and its headers arrived; any other status is read and classified.
    #[cfg(feature = "proxy")]
    pub(crate) async fn send_raw(
        &self,
        url: reqwest::Url,
        headers: &HeaderMap,
        body: bytes::Bytes,
    ) -> Result<(reqwest::Response, ResponseHeaders), UpstreamError> {
        let mut all = self.shared.fixed.clone();
        for (name, value) in headers {
            all.insert(name, value.clone());
        }
        if let Some(key) = &self.api_key {
            all.insert(X_API_KEY, key.0.clone());
        }
        all.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let resp = self
            .http
            .post(url)
            .headers(all)
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport(&e, UpstreamErrorKind::Connect))?;
        let headers = ResponseHeaders::parse(resp.headers(), SystemTime::now());
        if resp.status().is_success() {
            return Ok((resp, headers));
        }
        Err(self.status_error(resp, headers).await)
    }

    /// Reads the rest of a 2xx body (the proxy's plain answers), classifying a cut.
    #[cfg(feature = "proxy")]
    pub(crate) async fn read_body(
        &self,
        resp: reqwest::Response,
    ) -> Result<bytes::Bytes, UpstreamError> {
        self.bytes_capped(resp).await
    }

    /// A classified error of `kind` (the proxy's checks of what it forwards).
    #[cfg(feature = "proxy")]
    pub(crate) fn failed(&self, kind: UpstreamErrorKind, message: String) -> UpstreamError {
        self.classify(UpstreamError::new(kind, message))
    }

    /// A classified transport error of a body read.
    #[cfg(feature = "proxy")]
    pub(crate) fn interrupted(&self, e: &reqwest::Error) -> UpstreamError {
        self.transport(e, UpstreamErrorKind::Interrupted)
    }

    /// Classifies a stream's failure, as [`MessageStream`] does.
    #[cfg(feature = "proxy")]
    pub(crate) fn stream_failed(
        &self,
        e: super::sse::StreamError,
        status: u16,
        request_id: Option<&str>,
    ) -> UpstreamError {
        let mut u = stream_error_of(e);
        u.request_id = u.request_id.or_else(|| request_id.map(str::to_owned));
        u.status = u.status.or(Some(status));
        self.classify(u)
    }

    fn classify(&self, mut e: UpstreamError) -> UpstreamError {
        // Judged on what the upstream said: masking first could change its meaning (a key
        // that is a word of the message: with `x-api-key: model`, "model: claude-..." read
        // as "***: claude-..." was no longer a missing model, and the chain ended).
        let classification = self.shared.policy.classify(&e.failure());
        // An upstream that echoes the key ("invalid x-api-key: sk-...") must not put it into
        // our error, which callers log: not in the message, nor in the request id or error
        // code the error carries (adversarial review: a key there reached the client and
        // the logs).
        for key in [&self.api_key, &self.secret]
            .into_iter()
            .filter_map(|k| k.as_ref().and_then(|k| k.0.to_str().ok()))
            .filter(|k| !k.is_empty())
        {
            for field in [
                Some(&mut e.message),
                e.request_id.as_mut(),
                e.error_code.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                if field.contains(key) {
                    *field = mask_key(field, key);
                }
            }
        }
        UpstreamError {
            classification,
            ..e
        }
    }

    fn transport(&self, e: &reqwest::Error, kind: UpstreamErrorKind) -> UpstreamError {
        let kind = if e.is_timeout() {
            UpstreamErrorKind::Timeout
        } else {
            kind
        };
        // reqwest's message names the URL, never the headers (the key stays out).
        self.classify(UpstreamError::new(kind, error_chain(e)))
    }

    async fn send_request(
        &self,
        req: &MessagesRequest,
        stream: bool,
    ) -> Result<(reqwest::Response, ResponseHeaders), UpstreamError> {
        let resp = self
            .request(req, stream)
            .send()
            .await
            .map_err(|e| self.transport(&e, UpstreamErrorKind::Connect))?;
        let headers = ResponseHeaders::parse(resp.headers(), SystemTime::now());
        if resp.status().is_success() {
            return Ok((resp, headers));
        }
        Err(self.status_error(resp, headers).await)
    }

    async fn status_error(
        &self,
        mut resp: reqwest::Response,
        headers: ResponseHeaders,
    ) -> UpstreamError {
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        while body.len() < MAX_ERROR_BODY {
            match resp.chunk().await {
                Ok(Some(c)) => body.extend_from_slice(&c),
                // A body cut off or unreadable: the status still says what happened.
                Ok(None) | Err(_) => break,
            }
        }
        body.truncate(MAX_ERROR_BODY);
        let parsed = ErrorBody::parse(&body);
        let mut e = UpstreamError::new(
            UpstreamErrorKind::Status,
            match &parsed {
                Some(b) => b.error.message.clone(),
                None => format!(
                    "unreadable error body: {}",
                    String::from_utf8_lossy(&body)
                        .chars()
                        .take(200)
                        .collect::<String>()
                ),
            },
        );
        e.status = Some(status);
        if let Some(b) = parsed {
            e.error_code = b.error.error_code().map(str::to_owned);
            e.error_type = Some(b.error.error_type);
            e.request_id = b.request_id;
        }
        e.request_id = headers.request_id.clone().or(e.request_id);
        e.retry_after = headers.retry_after;
        e.should_retry = headers.should_retry;
        self.classify(e)
    }

    /// A plain answer's body, at most [`MAX_REPLY_BYTES`]: a larger one is an
    /// `InvalidResponse` (an upstream sending 300 MB grew the proxy by 300 MB a request, seen
    /// by the adversarial review; a Messages answer is far smaller).
    async fn bytes_capped(
        &self,
        mut resp: reqwest::Response,
    ) -> Result<bytes::Bytes, UpstreamError> {
        let too_large = || {
            self.classify(UpstreamError::new(
                UpstreamErrorKind::InvalidResponse,
                format!("the upstream's answer is larger than {MAX_REPLY_BYTES} bytes"),
            ))
        };
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_REPLY_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = super::gathered::Gathered::default();
        loop {
            let chunk = resp
                .chunk()
                .await
                .map_err(|e| self.transport(&e, UpstreamErrorKind::Interrupted))?;
            let Some(chunk) = chunk else { break };
            if body.len() + chunk.len() > MAX_REPLY_BYTES {
                return Err(too_large());
            }
            body.push(chunk);
        }
        Ok(body.into_bytes())
    }

    /// Sends `req` as a plain (non-streaming) request, whatever its `stream` field says.
    pub async fn send(&self, req: &MessagesRequest) -> Result<Reply, UpstreamError> {
        let timeout = self.shared.timeout;
        let attempt = async {
            let (resp, headers) = self.send_request(req, false).await?;
            let status = resp.status().as_u16();
            let request_id = headers.request_id.clone();
            let bytes = self.bytes_capped(resp).await?;
            match serde_json::from_slice::<MessagesResponse>(&bytes) {
                Ok(message) => Ok(Reply {
                    status,
                    message,
                    headers,
                }),
                Err(err) => {
                    let mut e = UpstreamError::new(
                        UpstreamErrorKind::InvalidResponse,
                        format!("{status} with a body that is not a message: {err}"),
                    );
                    e.status = Some(status);
                    e.request_id = request_id;
                    Err(self.classify(e))
                }
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(self.timed_out(timeout)),
        }
    }

    fn timed_out(&self, timeout: Duration) -> UpstreamError {
        self.classify(UpstreamError::new(
            UpstreamErrorKind::Timeout,
            format!("no answer within {timeout:?}"),
        ))
    }

    /// Sends `req` as a streaming request, whatever its `stream` field says. Returns once the
    /// 200 and its headers arrived; the events follow from [`MessageStream::next`].
    pub async fn stream(&self, req: &MessagesRequest) -> Result<MessageStream, UpstreamError> {
        let timeout = self.shared.timeout;
        let (resp, headers) =
            match tokio::time::timeout(timeout, self.send_request(req, true)).await {
                Ok(r) => r?,
                Err(_) => return Err(self.timed_out(timeout)),
            };
        Ok(MessageStream {
            status: resp.status().as_u16(),
            request_id: headers.request_id.clone(),
            headers,
            resp: Some(resp),
            decoder: MessageStreamDecoder::new(),
            ready: std::collections::VecDeque::new(),
            client: self.clone(),
        })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The events of a streaming answer. A failure after the 200 (an `error` event, a dropped
/// connection, garbage, a stream ending before `message_stop`) comes as one classified
/// [`UpstreamError`], after which the stream ends.
#[derive(Debug)]
pub struct MessageStream {
    /// The HTTP status (2xx).
    pub status: u16,
    /// The response headers, parsed.
    pub headers: ResponseHeaders,
    request_id: Option<String>,
    resp: Option<reqwest::Response>,
    decoder: MessageStreamDecoder,
    ready: std::collections::VecDeque<StreamEvent>,
    client: Client,
}

impl MessageStream {
    /// The next event; `None` once the stream ended well (after `message_stop`) or after an
    /// error was returned.
    pub async fn next(&mut self) -> Option<Result<StreamEvent, UpstreamError>> {
        loop {
            if let Some(ev) = self.ready.pop_front() {
                return Some(Ok(ev));
            }
            let idle = self.client.shared.timeout;
            let resp = self.resp.as_mut()?;
            let Ok(chunk) = tokio::time::timeout(idle, resp.chunk()).await else {
                self.resp = None;
                let err = self.client.classify(UpstreamError::new(
                    UpstreamErrorKind::Timeout,
                    format!("stream stalled: nothing for {idle:?}"),
                ));
                return Some(Err(self.with_request_id(err)));
            };
            let mut out = Vec::new();
            let step = match chunk {
                Ok(Some(bytes)) => self.decoder.push(&bytes, &mut out),
                Ok(None) => {
                    self.resp = None;
                    self.decoder.finish()
                }
                Err(e) => {
                    self.resp = None;
                    let err = self.client.transport(&e, UpstreamErrorKind::Interrupted);
                    return Some(Err(self.with_request_id(err)));
                }
            };
            self.ready.extend(out);
            if let Err(e) = step {
                self.resp = None;
                self.ready.clear();
                return Some(Err(self.stream_error(e)));
            }
        }
    }

    /// Puts back an event taken with [`Self::next`]: the next call returns it first.
    pub(crate) fn unread(&mut self, ev: StreamEvent) {
        self.ready.push_front(ev);
    }

    /// Reads the whole stream, returning its events in order, or the first failure.
    pub async fn collect(mut self) -> Result<Vec<StreamEvent>, UpstreamError> {
        let mut events = Vec::new();
        while let Some(ev) = self.next().await {
            events.push(ev?);
        }
        Ok(events)
    }

    fn with_request_id(&self, mut e: UpstreamError) -> UpstreamError {
        e.request_id = e.request_id.or_else(|| self.request_id.clone());
        e.status = e.status.or(Some(self.status));
        e
    }

    fn stream_error(&self, e: StreamError) -> UpstreamError {
        self.with_request_id(self.client.classify(stream_error_of(e)))
    }
}

/// A stream's failure as an (unclassified) upstream error.
fn stream_error_of(e: StreamError) -> UpstreamError {
    {
        match e {
            StreamError::Upstream(body) => {
                let body = *body;
                let mut u = UpstreamError::new(UpstreamErrorKind::StreamError, body.error.message);
                u.error_code = body.error.details.as_ref().and_then(|d| {
                    d.get("error_code")
                        .and_then(serde_json::Value::as_str)
                        .map(str::to_owned)
                });
                u.error_type = Some(body.error.error_type);
                u.request_id = body.request_id;
                u
            }
            StreamError::Truncated => UpstreamError::new(
                UpstreamErrorKind::Interrupted,
                "stream ended before message_stop".to_owned(),
            ),
            StreamError::Invalid(m) => UpstreamError::new(UpstreamErrorKind::InvalidResponse, m),
        }
    }
}

/// `message` with `key` replaced by `***`: every occurrence of a key of 16 characters or more
/// (a real key, wherever it is, glued to other text too); a shorter one only where it stands
/// as a token of its own (not inside a longer run of key characters: letters, digits, `-`,
/// `_`), so that a short test key that happens to be part of a word leaves the word whole
/// (seen by the new-user review: with `x-api-key: error`, "overloaded_error" came back as
/// "overloaded_***").
fn mask_key(message: &str, key: &str) -> String {
    if key.len() >= 16 {
        return message.replace(key, "***");
    }
    let keyish = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    let mut before: Option<char> = None;
    while let Some(at) = rest.find(key) {
        let (head, tail) = rest.split_at(at);
        let prev = head.chars().next_back().or(before);
        let next = tail[key.len()..].chars().next();
        out.push_str(head);
        if prev.is_some_and(keyish) || next.is_some_and(keyish) {
            // Part of a longer token: keep its first character and look on after it.
            let first = tail.chars().next().map_or(0, char::len_utf8);
            out.push_str(&tail[..first]);
            before = tail[..first].chars().next_back();
            rest = &tail[first..];
        } else {
            out.push_str("***");
            before = key.chars().next_back();
            rest = &tail[key.len()..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod mask_tests {
    use super::mask_key;

    #[test]
    fn a_key_is_masked_where_it_stands_alone_and_words_are_left_whole() {
        let key = "sk-ant-api03-secret_Key-0123";
        assert_eq!(
            mask_key(&format!("invalid x-api-key: {key}."), key),
            "invalid x-api-key: ***."
        );
        assert_eq!(
            mask_key(&format!("\"{key}\" and '{key}'"), key),
            "\"***\" and '***'"
        );
        assert_eq!(mask_key(key, key), "***");
        // A real key is masked glued to other text too (adversarial review: it leaked as
        // `...-987-suffix`, `..._x`, `abc...`).
        assert_eq!(
            mask_key(&format!("x{key} {key}-suffix {key}_x"), key),
            "x*** ***-suffix ***_x"
        );
        // A short key inside a longer token is not the key.
        assert_eq!(mask_key("xkey1 key1y", "key1"), "xkey1 key1y");
        assert_eq!(
            mask_key("mock overloaded_error (529)", "error"),
            "mock overloaded_error (529)"
        );
        assert_eq!(
            mask_key("mock overloaded_error (529)", "k"),
            "mock overloaded_error (529)"
        );
        assert_eq!(mask_key("key k was refused", "k"), "key *** was refused");
        assert_eq!(mask_key("ééé k é", "k"), "ééé *** é");
    }
}
