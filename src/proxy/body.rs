//! The request body as the proxy sees it: raw JSON, of which it reads only `model` and
//! `stream`, and in which it replaces only `model` (and `max_tokens`, when the target sets
//! it). Every other field goes upstream byte for byte, in its order.

use std::fmt;

use bytes::Bytes;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::ApiError;
use crate::pipeline::ChainTarget;

/// What the proxy reads of a request.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) model: String,
    pub(crate) stream: bool,
}

#[derive(Deserialize)]
struct RawHead<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream: Option<&'a RawValue>,
}

impl Head {
    /// Reads `model` and `stream` of a JSON object; a 400 in the API's shape otherwise.
    pub(crate) fn parse(body: &[u8]) -> Result<Head, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::invalid(
                "fusebox: the request body is empty; send a Messages request as JSON",
            ));
        }
        let raw: RawHead<'_> = serde_json::from_slice(body)
            .map_err(|e| ApiError::invalid(format!("fusebox: the body is not valid JSON: {e}")))?;
        let model = match raw.model.map(|m| serde_json::from_str::<String>(m.get())) {
            None => return Err(ApiError::invalid("model: Field required")),
            Some(Ok(m)) if !m.is_empty() => m,
            Some(_) => {
                return Err(ApiError::invalid(
                    "model: must be a non-empty string naming a model",
                ))
            }
        };
        let stream = match raw
            .stream
            .map(|s| serde_json::from_str::<Option<bool>>(s.get()))
        {
            None => false,
            Some(Ok(b)) => b.unwrap_or(false),
            Some(Err(_)) => return Err(ApiError::invalid("stream: must be true or false")),
        };
        Ok(Head { model, stream })
    }
}

/// The body for `target`: the original bytes when it asks for the requested model and sets
/// no `max_tokens`, else the same fields in the same order with `model` (and `max_tokens`)
/// replaced.
pub(crate) fn for_target(original: &Bytes, requested: &str, target: &ChainTarget) -> Bytes {
    if target.model == requested && target.max_tokens.is_none() {
        return original.clone();
    }
    match rewrite(original, target) {
        Some(b) => Bytes::from(b),
        // Not reached: the body parsed as an object before.
        None => original.clone(),
    }
}

fn rewrite(original: &[u8], target: &ChainTarget) -> Option<Vec<u8>> {
    let Fields(fields) = serde_json::from_slice(original).ok()?;
    let mut out = Vec::with_capacity(original.len() + 32);
    out.push(b'{');
    let mut model_done = false;
    let mut max_done = target.max_tokens.is_none();
    let mut first = true;
    let mut put = |out: &mut Vec<u8>, key: &str, value: &[u8]| {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, key);
        out.push(b':');
        out.extend_from_slice(value);
    };
    let model = serde_json::to_vec(&target.model).ok()?;
    for (key, value) in &fields {
        match key.as_str() {
            "model" => {
                if !std::mem::replace(&mut model_done, true) {
                    put(&mut out, key, &model);
                }
            }
            "max_tokens" if target.max_tokens.is_some() => {
                if !std::mem::replace(&mut max_done, true) {
                    let m = target.max_tokens.unwrap_or_default().to_string();
                    put(&mut out, key, m.as_bytes());
                }
            }
            _ => put(&mut out, key, value.get().as_bytes()),
        }
    }
    if !model_done {
        put(&mut out, "model", &model);
    }
    if !max_done {
        let m = target.max_tokens.unwrap_or_default().to_string();
        put(&mut out, "max_tokens", m.as_bytes());
    }
    out.push(b'}');
    Some(out)
}

/// A JSON object's fields in order, values as they came.
struct Fields(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut v = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(entry) = map.next_entry::<String, Box<RawValue>>()? {
                    v.push(entry);
                }
                Ok(Fields(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Whether `bytes` is one JSON object (what a 2xx Messages answer must be).
pub(crate) fn is_object(bytes: &[u8]) -> bool {
    struct Object;
    impl<'de> Deserialize<'de> for Object {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Object;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Object, A::Error> {
                    while map
                        .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                        .is_some()
                    {}
                    Ok(Object)
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_slice::<Object>(bytes).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes: a head or a 400, never a panic.
        #[test]
        fn any_bytes_parse_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Err(e) = Head::parse(&bytes) {
                prop_assert_eq!(e.status, 400);
            }
            let _ = is_object(&bytes);
        }

        /// A rewritten body is the same object with only `model` (and `max_tokens`) changed.
        #[test]
        fn a_rewrite_changes_only_model_and_max_tokens(
            fields in proptest::collection::btree_map("[a-z_]{1,8}", any::<i64>(), 0..8),
            text in ".{0,20}",
            max in proptest::option::of(1u32..100_000),
        ) {
            let mut v = serde_json::Map::new();
            for (k, n) in &fields {
                v.insert(k.clone(), serde_json::json!({"n": n, "t": text}));
            }
            v.insert("model".into(), serde_json::json!("asked"));
            let original = Bytes::from(serde_json::Value::Object(v.clone()).to_string());
            let out = for_target(&original, "asked", &target("other", max));
            let got: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
            let mut want = v;
            want.insert("model".into(), serde_json::json!("other"));
            if let Some(m) = max {
                want.insert("max_tokens".into(), serde_json::json!(m));
            }
            prop_assert_eq!(got, serde_json::Value::Object(want));
        }
    }

    fn target(model: &str, max_tokens: Option<u32>) -> ChainTarget {
        ChainTarget {
            name: "t".to_owned(),
            model: model.to_owned(),
            max_tokens,
            timeout: std::time::Duration::from_secs(1),
            context_window: None,
        }
    }

    #[test]
    fn the_same_model_forwards_the_original_bytes() {
        let body = Bytes::from_static(br#"{ "model" : "a",  "x":[1, 2] }"#);
        let out = for_target(&body, "a", &target("a", None));
        assert_eq!(out, body);
    }

    #[test]
    fn another_model_replaces_only_model_and_keeps_every_other_field_as_written() {
        let body =
            Bytes::from_static(br#"{"z":{"k": [1, 2.50]},"model":"a","max_tokens":9,"u":null}"#);
        let out = for_target(&body, "a", &target("b", None));
        assert_eq!(
            &out[..],
            br#"{"z":{"k": [1, 2.50]},"model":"b","max_tokens":9,"u":null}"#
        );
        let out = for_target(&body, "a", &target("b", Some(5)));
        assert_eq!(
            &out[..],
            br#"{"z":{"k": [1, 2.50]},"model":"b","max_tokens":5,"u":null}"#
        );
    }

    #[test]
    fn bad_bodies_are_400s_not_panics() {
        for b in [
            &b""[..],
            b"  ",
            b"{",
            b"[]",
            b"\"x\"",
            b"{}",
            b"{\"model\":3}",
            b"{\"model\":\"\"}",
            b"{\"model\":\"a\",\"stream\":\"yes\"}",
            b"\xff\xfe",
        ] {
            let e = Head::parse(b).expect_err("refused");
            assert_eq!(e.status, 400, "{:?}", String::from_utf8_lossy(b));
        }
        let h = Head::parse(br#"{"model":"m","stream":true}"#).expect("parses");
        assert!(h.stream);
        assert_eq!(h.model, "m");
    }
}
