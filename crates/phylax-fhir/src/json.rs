//! Strict JSON parsing for untrusted input.
//!
//! `serde_json::Value` silently keeps the last of duplicate keys; FHIR says a
//! JSON object must not repeat a name, and an attacker can use duplicates to
//! make two parsers disagree about a resource. This parser refuses them, and
//! refuses nesting deeper than [`MAX_DEPTH`] (serde_json's own recursion limit
//! stops deeper bombs before the stack is at risk). Numbers keep their exact
//! text (`arbitrary_precision`) so FHIR decimals round-trip unchanged.

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

/// Maximum nesting of objects and arrays accepted from the network.
pub const MAX_DEPTH: usize = 100;

/// Why a body is not acceptable JSON.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct JsonError(String);

impl JsonError {
    /// A message safe to return to the client: it names the position and the
    /// kind of problem, never echoes content.
    pub fn message(&self) -> &str {
        &self.0
    }
}

/// Parse a body into a JSON value, refusing duplicate keys and deep nesting.
pub fn parse_strict(bytes: &[u8]) -> Result<Value, JsonError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = Seed { depth: 0 }
        .deserialize(&mut de)
        .map_err(|e| JsonError(sanitize(&e)))?;
    de.end().map_err(|e| JsonError(sanitize(&e)))?;
    Ok(v)
}

fn sanitize(e: &serde_json::Error) -> String {
    // serde_json's messages may quote a key (our duplicate-key message does
    // too, but keys are FHIR element names, not values); keep the category
    // and position only for syntax errors, which could otherwise echo input.
    match e.classify() {
        serde_json::error::Category::Data => format!("{e}"),
        serde_json::error::Category::Eof => {
            format!(
                "unexpected end of JSON at line {} column {}",
                e.line(),
                e.column()
            )
        }
        _ => format!("malformed JSON at line {} column {}", e.line(), e.column()),
    }
}

struct Seed {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Seed {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor { depth: self.depth })
    }
}

struct ValueVisitor {
    depth: usize,
}

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(de::Error::custom("JSON nested too deeply"));
        }
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Seed {
            depth: self.depth + 1,
        })? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(de::Error::custom("JSON nested too deeply"));
        }
        // With arbitrary_precision, serde_json hands numbers to us as a
        // one-entry map with a private key; let serde_json rebuild those.
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "$serde_json::private::Number" {
                let s: String = map.next_value()?;
                let n: serde_json::Number =
                    s.parse().map_err(|_| de::Error::custom("invalid number"))?;
                return Ok(Value::Number(n));
            }
            let v = map.next_value_seed(Seed {
                depth: self.depth + 1,
            })?;
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!(
                    "duplicate JSON key \"{}\"",
                    key.escape_debug().take(64).collect::<String>()
                )));
            }
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_normal_json_and_keeps_decimal_precision() {
        let v = parse_strict(br#"{"a":[1,2.50,{"b":null}],"c":"x"}"#).unwrap();
        assert_eq!(v["a"][1].to_string(), "2.50");
        assert_eq!(v["c"], "x");
    }

    #[test]
    fn refuses_duplicates_depth_and_garbage() {
        assert!(parse_strict(br#"{"a":1,"a":2}"#)
            .unwrap_err()
            .message()
            .contains("duplicate"));
        assert!(parse_strict(br#"{"x":{"a":1,"a":2}}"#).is_err());
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        assert!(parse_strict(deep.as_bytes()).is_err());
        let deep_obj = r#"{"a":"#.repeat(150) + "1" + &"}".repeat(150);
        assert!(parse_strict(deep_obj.as_bytes()).is_err());
        assert!(parse_strict(b"{").is_err());
        assert!(parse_strict(b"{} trailing").is_err());
        assert!(parse_strict(b"\xff\xfe").is_err());
        assert!(parse_strict(b"").is_err());
        let ok = r#"{"a":"#.repeat(50) + "1" + &"}".repeat(50);
        assert!(parse_strict(ok.as_bytes()).is_ok());
    }

    #[test]
    fn syntax_errors_do_not_echo_input() {
        let e = parse_strict(br#"{"name": SECRETNAME}"#).unwrap_err();
        assert!(!e.message().contains("SECRETNAME"));
    }
}
