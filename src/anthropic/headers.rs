//! Response headers fusebox reads: `request-id`, `retry-after-ms`, `retry-after` (seconds or
//! an HTTP date), `x-should-retry` and the `anthropic-ratelimit-*` family.
//!
//! Malformed values never panic: each parser returns a [`HeaderError`] saying what is wrong,
//! and [`ResponseHeaders::parse`] keeps the problems it met in
//! [`ResponseHeaders::problems`] (with the value cut to a short prefix) next to what it could
//! read.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};

/// The longest wait a `retry-after` / `retry-after-ms` value is read as: one day. Larger
/// values (`1e12`, a date years ahead) are clamped to it; the retry configuration caps the
/// wait much lower anyway.
pub const RETRY_AFTER_CEILING: Duration = Duration::from_secs(24 * 60 * 60);

/// Why a header value could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The value is not valid visible ASCII.
    #[error("not visible ASCII")]
    NotAscii,
    /// A negative number.
    #[error("negative")]
    Negative,
    /// Neither a number nor a date of the expected form.
    #[error("neither a number nor a valid date")]
    Malformed,
    /// A number where a whole number was expected, or one too large for it.
    #[error("not a whole number in range")]
    NotAnInteger,
}

fn number_of_seconds(value: &str, unit: Duration) -> Result<Duration, HeaderError> {
    let v: f64 = value.trim().parse().map_err(|_| HeaderError::Malformed)?;
    if v.is_nan() {
        return Err(HeaderError::Malformed);
    }
    if v < 0.0 {
        return Err(HeaderError::Negative);
    }
    let ceiling = RETRY_AFTER_CEILING.as_secs_f64();
    let secs = v * unit.as_secs_f64();
    if secs >= ceiling {
        return Ok(RETRY_AFTER_CEILING);
    }
    Ok(Duration::try_from_secs_f64(secs).unwrap_or(RETRY_AFTER_CEILING))
}

/// Reads a `retry-after-ms` value: a non-negative number of milliseconds (fractions allowed,
/// as the official SDKs read it), clamped to [`RETRY_AFTER_CEILING`].
pub fn parse_retry_after_ms(value: &str) -> Result<Duration, HeaderError> {
    number_of_seconds(value, Duration::from_millis(1))
}

/// Reads a `retry-after` value: a non-negative number of seconds, or an HTTP date (a date
/// already past gives zero), clamped to [`RETRY_AFTER_CEILING`]. `now` is the wall clock.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Result<Duration, HeaderError> {
    let trimmed = value.trim();
    match number_of_seconds(trimmed, Duration::from_secs(1)) {
        Err(HeaderError::Malformed) => {}
        other => return other,
    }
    let at = httpdate::parse_http_date(trimmed).map_err(|_| HeaderError::Malformed)?;
    Ok(at
        .duration_since(now)
        .unwrap_or(Duration::ZERO)
        .min(RETRY_AFTER_CEILING))
}

/// Reads an RFC 3339 timestamp such as `2026-11-29T20:30:00Z` or
/// `2026-11-29T21:30:00.5+01:00` (the `anthropic-ratelimit-*-reset` headers).
pub fn parse_rfc3339(value: &str) -> Result<SystemTime, HeaderError> {
    let b = value.trim().as_bytes();
    let num = |from: usize, len: usize| -> Result<u64, HeaderError> {
        let part = b.get(from..from + len).ok_or(HeaderError::Malformed)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return Err(HeaderError::Malformed);
        }
        Ok(part
            .iter()
            .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0')))
    };
    let sep = |at: usize, allowed: &[u8]| -> Result<(), HeaderError> {
        match b.get(at) {
            Some(c) if allowed.contains(c) => Ok(()),
            _ => Err(HeaderError::Malformed),
        }
    };
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    sep(4, b"-")?;
    sep(7, b"-")?;
    sep(10, b"Tt ")?;
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    sep(13, b":")?;
    sep(16, b":")?;
    if !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(HeaderError::Malformed);
    }
    let mut i = 19;
    let mut nanos = 0u64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 9 {
                nanos = nanos * 10 + u64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return Err(HeaderError::Malformed);
        }
        for _ in (i - start)..9 {
            nanos *= 10;
        }
    }
    let offset: i64 = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() => {
            sep(i + 3, b":")?;
            let (h, m) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if h > 23 || m > 59 {
                return Err(HeaderError::Malformed);
            }
            let o = (h * 3600 + m * 60) as i64;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return Err(HeaderError::Malformed),
    };
    let days = days_from_civil(year as i64, month as i64, day as i64);
    let secs = days * 86_400 + (hour * 3600 + minute * 60 + second) as i64 - offset;
    let secs = u64::try_from(secs).map_err(|_| HeaderError::Malformed)?;
    UNIX_EPOCH
        .checked_add(Duration::new(secs, nanos as u32))
        .ok_or(HeaderError::Malformed)
}

fn is_leap(y: u64) -> bool {
    (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
}

fn days_in_month(y: u64, m: u64) -> u64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// One family of `anthropic-ratelimit-<kind>-{limit,remaining,reset}` headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// `-limit`: the most allowed in the period.
    pub limit: Option<u64>,
    /// `-remaining`: what is left.
    pub remaining: Option<u64>,
    /// `-reset`: when it is fully replenished (RFC 3339).
    pub reset: Option<SystemTime>,
}

/// The four `anthropic-ratelimit-*` families.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    /// `anthropic-ratelimit-requests-*`.
    pub requests: RateLimit,
    /// `anthropic-ratelimit-tokens-*`.
    pub tokens: RateLimit,
    /// `anthropic-ratelimit-input-tokens-*`.
    pub input_tokens: RateLimit,
    /// `anthropic-ratelimit-output-tokens-*`.
    pub output_tokens: RateLimit,
}

/// A header that was present but could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderProblem {
    /// The header's name.
    pub header: String,
    /// The start of its value (at most 64 characters, non-ASCII replaced).
    pub value: String,
    /// What is wrong.
    pub error: HeaderError,
}

impl std::fmt::Display for HeaderProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "header {}: {:?}: {}",
            self.header, self.value, self.error
        )
    }
}

/// What fusebox reads from a response's headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseHeaders {
    /// `request-id` (at most 256 characters kept).
    pub request_id: Option<String>,
    /// The wait asked for: `retry-after-ms` when readable, else `retry-after`.
    pub retry_after: Option<Duration>,
    /// `x-should-retry`: `true` or `false`.
    pub should_retry: Option<bool>,
    /// The `anthropic-ratelimit-*` headers.
    pub rate_limits: RateLimits,
    /// Headers present but unreadable.
    pub problems: Vec<HeaderProblem>,
}

const MAX_KEPT: usize = 256;

/// The `anthropic-ratelimit-*` headers, family by family (requests, tokens, input tokens,
/// output tokens), each as limit, remaining, reset.
const RATE_LIMIT_HEADERS: [&str; 12] = [
    "anthropic-ratelimit-requests-limit",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-limit",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-limit",
    "anthropic-ratelimit-input-tokens-remaining",
    "anthropic-ratelimit-input-tokens-reset",
    "anthropic-ratelimit-output-tokens-limit",
    "anthropic-ratelimit-output-tokens-remaining",
    "anthropic-ratelimit-output-tokens-reset",
];

impl ResponseHeaders {
    /// Reads `headers`; `now` (the wall clock) turns an HTTP-date `retry-after` into a wait.
    pub fn parse(headers: &HeaderMap, now: SystemTime) -> Self {
        let mut out = ResponseHeaders::default();
        let mut problems = Vec::new();
        // One pass over the headers (the first value of each name), comparing names as
        // strings: no header name is parsed or hashed per response (this runs on every
        // answer the proxy forwards).
        const FIXED: [&str; 4] = [
            "request-id",
            "retry-after-ms",
            "retry-after",
            "x-should-retry",
        ];
        let mut found: [Option<&HeaderValue>; 4 + RATE_LIMIT_HEADERS.len()] =
            [None; 4 + RATE_LIMIT_HEADERS.len()];
        for (name, value) in headers {
            let n = name.as_str();
            let at = match n.strip_prefix("anthropic-ratelimit-") {
                Some(_) => RATE_LIMIT_HEADERS
                    .iter()
                    .position(|h| *h == n)
                    .map(|i| i + 4),
                None => FIXED.iter().position(|h| *h == n),
            };
            if let Some(slot) = at.and_then(|i| found.get_mut(i)) {
                slot.get_or_insert(value);
            }
        }
        let mut read = |i: usize, name: &str| -> Option<String> {
            let v = found.get(i).copied().flatten()?;
            match v.to_str() {
                Ok(s) => Some(s.to_owned()),
                Err(_) => {
                    problems.push(problem(name, &String::from_utf8_lossy(v.as_bytes()), {
                        HeaderError::NotAscii
                    }));
                    None
                }
            }
        };
        out.request_id = read(0, FIXED[0]).map(|s| s.chars().take(MAX_KEPT).collect());
        let ms = read(1, FIXED[1]);
        let secs = read(2, FIXED[2]);
        let should = read(3, FIXED[3]);
        let mut families = [
            ("requests", RateLimit::default()),
            ("tokens", RateLimit::default()),
            ("input-tokens", RateLimit::default()),
            ("output-tokens", RateLimit::default()),
        ];
        let mut i = 3;
        let raw = RATE_LIMIT_HEADERS.map(|name| {
            i += 1;
            read(i, name).map(|v| (name, v))
        });

        if let Some(v) = ms {
            match parse_retry_after_ms(&v) {
                Ok(d) => out.retry_after = Some(d),
                Err(e) => problems.push(problem("retry-after-ms", &v, e)),
            }
        }
        if let Some(v) = secs {
            match parse_retry_after(&v, now) {
                Ok(d) => {
                    out.retry_after.get_or_insert(d);
                }
                Err(e) => problems.push(problem("retry-after", &v, e)),
            }
        }
        if let Some(v) = should {
            match v.trim() {
                s if s.eq_ignore_ascii_case("true") => out.should_retry = Some(true),
                s if s.eq_ignore_ascii_case("false") => out.should_retry = Some(false),
                _ => problems.push(problem("x-should-retry", &v, HeaderError::Malformed)),
            }
        }
        for (i, entry) in raw.into_iter().enumerate() {
            let Some((name, v)) = entry else { continue };
            let family = &mut families[i / 3].1;
            match i % 3 {
                0 | 1 => match v.trim().parse::<u64>() {
                    Ok(n) if i % 3 == 0 => family.limit = Some(n),
                    Ok(n) => family.remaining = Some(n),
                    Err(_) => problems.push(problem(name, &v, HeaderError::NotAnInteger)),
                },
                _ => match parse_rfc3339(&v) {
                    Ok(t) => family.reset = Some(t),
                    Err(e) => problems.push(problem(name, &v, e)),
                },
            }
        }
        let [(_, requests), (_, tokens), (_, input_tokens), (_, output_tokens)] = families;
        out.rate_limits = RateLimits {
            requests,
            tokens,
            input_tokens,
            output_tokens,
        };
        out.problems = problems;
        out
    }
}

fn problem(header: &str, value: &str, error: HeaderError) -> HeaderProblem {
    HeaderProblem {
        header: header.to_owned(),
        value: value
            .chars()
            .take(64)
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .collect(),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_780_000_000)
    }

    #[test]
    fn retry_after_seconds_milliseconds_and_dates() {
        assert_eq!(parse_retry_after("7", now()), Ok(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after(" 1.5 ", now()),
            Ok(Duration::from_millis(1500))
        );
        assert_eq!(parse_retry_after_ms("250"), Ok(Duration::from_millis(250)));
        let later = httpdate::fmt_http_date(now() + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now()),
            Ok(Duration::from_secs(30))
        );
    }

    #[test]
    fn bad_retry_after_values_get_a_clear_result() {
        assert_eq!(parse_retry_after("-1", now()), Err(HeaderError::Negative));
        assert_eq!(parse_retry_after_ms("-1"), Err(HeaderError::Negative));
        assert_eq!(parse_retry_after("abc", now()), Err(HeaderError::Malformed));
        assert_eq!(parse_retry_after("", now()), Err(HeaderError::Malformed));
        assert_eq!(parse_retry_after("NaN", now()), Err(HeaderError::Malformed));
        assert_eq!(parse_retry_after("1e12", now()), Ok(RETRY_AFTER_CEILING));
        assert_eq!(parse_retry_after("inf", now()), Ok(RETRY_AFTER_CEILING));
        assert_eq!(
            parse_retry_after(&"9".repeat(5000), now()),
            Ok(RETRY_AFTER_CEILING)
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now()),
            Ok(Duration::ZERO),
            "a past date is no wait"
        );
        assert_eq!(
            parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now()),
            Ok(RETRY_AFTER_CEILING)
        );
    }

    #[test]
    fn rfc3339_reads_zulu_offsets_and_fractions() {
        let t = parse_rfc3339("1970-01-02T00:00:00Z");
        assert_eq!(t, Ok(UNIX_EPOCH + Duration::from_secs(86_400)));
        let t = parse_rfc3339("1970-01-02T01:00:00.25+01:00");
        assert_eq!(t, Ok(UNIX_EPOCH + Duration::from_millis(86_400_250)));
        let t = parse_rfc3339("2024-02-29T12:00:00Z");
        assert_eq!(t, Ok(UNIX_EPOCH + Duration::from_secs(1_709_208_000)));
        for bad in [
            "",
            "2023-02-29T12:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00.Z",
            "1969-12-31T23:59:59Z",
            "2024-01-01T00:00:00+1:00",
            "２０２４-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), Err(HeaderError::Malformed), "{bad}");
        }
    }

    #[test]
    fn response_headers_read_what_they_can_and_list_the_rest() {
        let mut h = HeaderMap::new();
        h.insert("request-id", http::HeaderValue::from_static("req_123"));
        h.insert("retry-after", http::HeaderValue::from_static("abc"));
        h.insert("x-should-retry", http::HeaderValue::from_static("false"));
        h.insert(
            "anthropic-ratelimit-requests-limit",
            http::HeaderValue::from_static("50"),
        );
        h.insert(
            "anthropic-ratelimit-requests-remaining",
            http::HeaderValue::from_static("-1"),
        );
        h.insert(
            "anthropic-ratelimit-tokens-reset",
            http::HeaderValue::from_static("1970-01-01T00:01:00Z"),
        );
        h.insert(
            "anthropic-ratelimit-output-tokens-limit",
            http::HeaderValue::from_bytes(b"\xff12").expect("opaque bytes are a valid value"),
        );
        let r = ResponseHeaders::parse(&h, now());
        assert_eq!(r.request_id.as_deref(), Some("req_123"));
        assert_eq!(r.retry_after, None);
        assert_eq!(r.should_retry, Some(false));
        assert_eq!(r.rate_limits.requests.limit, Some(50));
        assert_eq!(r.rate_limits.requests.remaining, None);
        assert_eq!(
            r.rate_limits.tokens.reset,
            Some(UNIX_EPOCH + Duration::from_secs(60))
        );
        let names: Vec<_> = r.problems.iter().map(|p| p.header.as_str()).collect();
        assert_eq!(
            names,
            [
                "anthropic-ratelimit-output-tokens-limit",
                "retry-after",
                "anthropic-ratelimit-requests-remaining"
            ]
        );
        assert_eq!(r.problems[0].error, HeaderError::NotAscii);
        assert_eq!(
            r.problems[2].to_string(),
            "header anthropic-ratelimit-requests-remaining: \"-1\": not a whole number in range"
        );
    }

    #[test]
    fn retry_after_ms_wins_over_retry_after() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", http::HeaderValue::from_static("7"));
        h.insert("retry-after-ms", http::HeaderValue::from_static("1500"));
        let r = ResponseHeaders::parse(&h, now());
        assert_eq!(r.retry_after, Some(Duration::from_millis(1500)));
        h.insert("retry-after-ms", http::HeaderValue::from_static("oops"));
        let r = ResponseHeaders::parse(&h, now());
        assert_eq!(r.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(r.problems.len(), 1);
    }

    proptest! {
        #[test]
        fn retry_after_never_panics_and_stays_under_the_ceiling(s in "\\PC{0,40}") {
            if let Ok(d) = parse_retry_after(&s, now()) {
                prop_assert!(d <= RETRY_AFTER_CEILING);
            }
            if let Ok(d) = parse_retry_after_ms(&s) {
                prop_assert!(d <= RETRY_AFTER_CEILING);
            }
            let _ = parse_rfc3339(&s);
        }

        #[test]
        fn whole_seconds_read_back_exactly(n in 0u64..86_400) {
            prop_assert_eq!(parse_retry_after(&n.to_string(), now()), Ok(Duration::from_secs(n)));
        }

        #[test]
        fn rfc3339_round_trips_through_http_dates(secs in 0u64..8_000_000_000) {
            // httpdate is an independent implementation of the same calendar arithmetic.
            let t = UNIX_EPOCH + Duration::from_secs(secs);
            let text = rfc3339_of(secs);
            prop_assert_eq!(parse_rfc3339(&text), Ok(t));
            prop_assert_eq!(httpdate::parse_http_date(&httpdate::fmt_http_date(t)).ok(), Some(t));
        }
    }

    /// Formats with a civil-from-days algorithm written independently of the parser's.
    fn rfc3339_of(secs: u64) -> String {
        let days = secs / 86_400;
        let rem = secs % 86_400;
        let (mut y, mut d) = (1970u64, days);
        loop {
            let len = if is_leap(y) { 366 } else { 365 };
            if d < len {
                break;
            }
            d -= len;
            y += 1;
        }
        let mut m = 1;
        while d >= days_in_month(y, m) {
            d -= days_in_month(y, m);
            m += 1;
        }
        format!(
            "{y:04}-{m:02}-{:02}T{:02}:{:02}:{:02}Z",
            d + 1,
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )
    }
}
