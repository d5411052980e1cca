//! The request as the cache sees it: the fields that change the answer, in one canonical
//! form, and its "similar" form. Pure functions over `serde_json::Value`.

use serde_json::{Map, Value};
use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};

/// Top-level request fields that do not change the answer: the model (any model's answer may
/// serve), streaming (the same answer, delivered differently), metadata (the caller's
/// labels) and the service tier.
pub const IGNORED_FIELDS: &[&str] = &["model", "stream", "metadata", "service_tier"];

/// The canonical exact form of a Messages request, or `None` when it is not a JSON object
/// with a `messages` array (not cacheable).
///
/// Dropped: [`IGNORED_FIELDS`], and `cache_control` markers anywhere (prompt-caching hints).
/// Unified: a string `content` or `system` and the same text as one text block; a number
/// with an integral value (`1` and `1.0`). Everything else (system, messages, tools,
/// tool_choice, temperature, top_p, top_k, max_tokens, stop_sequences, thinking...) is kept
/// exactly.
pub fn exact(request: &Value) -> Option<Value> {
    let obj = request.as_object()?;
    if !obj.get("messages").is_some_and(Value::is_array) {
        return None;
    }
    let mut out = Map::new();
    for (k, v) in obj {
        if IGNORED_FIELDS.contains(&k.as_str()) {
            continue;
        }
        let mut v = strip_cache_control(v);
        match k.as_str() {
            "system" => v = blocks(v),
            "messages" => {
                if let Value::Array(msgs) = &mut v {
                    for m in msgs.iter_mut() {
                        if let Some(c) = m.as_object_mut().and_then(|m| m.remove("content")) {
                            if let Some(m) = m.as_object_mut() {
                                m.insert("content".to_owned(), blocks(c));
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        out.insert(k.clone(), v);
    }
    Some(Value::Object(out))
}

/// The "similar" form of an exact form: the text blocks of the last message, when it is the
/// user's, folded with [`fold_text`]; the rest (system, earlier turns, the last message's
/// non-text blocks, tools, sampling settings) unchanged. `None` when the last message is not
/// a user message with text (then only exact lookups apply).
pub fn similar(exact: &Value) -> Option<Value> {
    let mut v = exact.clone();
    let last = v
        .get_mut("messages")?
        .as_array_mut()?
        .last_mut()?
        .as_object_mut()?;
    if last.get("role").and_then(Value::as_str) != Some("user") {
        return None;
    }
    let mut folded_any = false;
    for block in last.get_mut("content")?.as_array_mut()? {
        let Some(b) = block.as_object_mut() else {
            continue;
        };
        if b.get("type").and_then(Value::as_str) != Some("text") {
            continue;
        }
        if let Some(Value::String(t)) = b.get_mut("text") {
            *t = fold_text(t);
            folded_any = true;
        }
    }
    folded_any.then_some(v)
}

/// Case-folded (Unicode lower case), words split on Unicode whitespace and joined by one
/// space, punctuation (Unicode category P*) stripped from the start and end of each word;
/// a word that was only punctuation disappears. Punctuation *inside* a word is kept, so
/// `2.5` and `25`, `e-mail` and `email`, `don't` and `dont` stay different: a wrong cached
/// answer is worse than none. Symbols (`+`, `$`, `=`) are kept everywhere.
pub fn fold_text(text: &str) -> String {
    let lower = text.to_lowercase();
    let mut out = String::with_capacity(lower.len());
    for word in lower.split_whitespace() {
        let word = word.trim_matches(is_punctuation);
        if word.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

fn is_punctuation(c: char) -> bool {
    c.general_category_group() == GeneralCategoryGroup::Punctuation
}

/// A string as one text block; anything else unchanged.
fn blocks(v: Value) -> Value {
    match v {
        Value::String(s) => {
            let mut b = Map::new();
            b.insert("type".to_owned(), Value::String("text".to_owned()));
            b.insert("text".to_owned(), Value::String(s));
            Value::Array(vec![Value::Object(b)])
        }
        other => other,
    }
}

fn strip_cache_control(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "cache_control")
                .map(|(k, v)| (k.clone(), strip_cache_control(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_cache_control).collect()),
        other => other.clone(),
    }
}

/// JSON with object keys sorted and numbers in one form, whatever order the input had (and
/// whether or not serde_json keeps insertion order): equal requests give equal text.
pub fn canonical(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let integral = n
                .as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .filter(|_| !n.is_i64() && !n.is_u64());
            match integral {
                Some(f) => out.push_str(&format!("{}", f as i64)),
                None => out.push_str(&n.to_string()),
            }
        }
        Value::String(s) => out.push_str(&Value::String(s.clone()).to_string()),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(x) = m.get(k) {
                    write_canonical(x, out);
                }
            }
            out.push('}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fold_text_ignores_case_whitespace_and_edge_punctuation() {
        assert_eq!(
            fold_text("  What is the capital   of France?! "),
            "what is the capital of france"
        );
        assert_eq!(fold_text("¿Qué TAL , amigo?"), "qué tal amigo");
        assert_eq!(fold_text("«Bonjour»\u{3000}le monde。"), "bonjour le monde");
    }

    #[test]
    fn fold_text_keeps_what_changes_the_meaning() {
        assert_ne!(fold_text("what is 2.5 + 1"), fold_text("what is 25 + 1"));
        assert_ne!(fold_text("2+2"), fold_text("2-2"));
        assert_ne!(fold_text("2 + 2"), fold_text("2 2"));
        assert_ne!(fold_text("e-mail"), fold_text("email"));
    }

    #[test]
    fn exact_drops_fields_that_do_not_change_the_answer() {
        let a = json!({"model": "a", "stream": true, "metadata": {"user_id": "u"},
            "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]});
        let b = json!({"messages": [{"content": [{"type": "text", "text": "Hi",
            "cache_control": {"type": "ephemeral"}}], "role": "user"}], "max_tokens": 100.0,
            "model": "b"});
        assert_eq!(
            canonical(&exact(&a).unwrap_or_default()),
            canonical(&exact(&b).unwrap_or_default())
        );
        let c = json!({"max_tokens": 100, "temperature": 0.5,
            "messages": [{"role": "user", "content": "Hi"}]});
        assert_ne!(
            canonical(&exact(&a).unwrap_or_default()),
            canonical(&exact(&c).unwrap_or_default())
        );
    }

    #[test]
    fn not_a_request_is_not_cacheable() {
        for v in [
            json!(null),
            json!([1]),
            json!("x"),
            json!({"messages": "x"}),
            json!({}),
        ] {
            assert!(exact(&v).is_none(), "{v}");
        }
    }

    #[test]
    fn similar_needs_a_last_user_text() {
        let e = exact(&json!({"messages": [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]}));
        assert!(e.as_ref().and_then(similar).is_none());
        let e = exact(&json!({"messages": [{"role": "user", "content": " HI! "}]}));
        let s = e.as_ref().and_then(similar).map(|v| canonical(&v));
        assert_eq!(
            s.as_deref(),
            Some(r#"{"messages":[{"content":[{"text":"hi","type":"text"}],"role":"user"}]}"#)
        );
    }
}
