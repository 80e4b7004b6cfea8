//! JSON that refuses duplicate object members, at any depth.
//!
//! serde_json keeps the last of two members with the same name when it
//! builds a map or a `Value`, and jsonwebtoken parses headers and claims that
//! way. Two parsers that pick different duplicates (an upstream proxy taking
//! the first `sub`, keyturn the last) is a known JWT confusion attack, and
//! RFC 7515 section 5.2 lets a recipient reject such input: keyturn does, so
//! every header, claim set and key set is parsed here first.

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Parses `bytes` as one JSON value, refusing a duplicate member anywhere.
/// serde_json's recursion limit (128) bounds the nesting.
pub fn parse(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = StrictSeed.deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// The prefix of the error for a duplicate member (callers tell it apart
/// from a syntax error by it).
pub const DUPLICATE: &str = "duplicate member";

struct StrictSeed;

impl<'de> DeserializeSeed<'de> for StrictSeed {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
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
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        StrictSeed.deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(StrictSeed)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "{DUPLICATE} `{}`",
                    key.chars().take(64).collect::<String>().escape_debug()
                )));
            }
            let v = map.next_value_seed(StrictSeed)?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// `T` read from a value [`parse`] already checked.
pub fn from_value<T: for<'de> Deserialize<'de>>(v: Value) -> Result<T, serde_json::Error> {
    serde_json::from_value(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_refused_at_any_depth() {
        assert!(parse(br#"{"a":1,"b":2}"#).is_ok());
        let top = parse(br#"{"sub":"alice","sub":"admin"}"#).unwrap_err();
        assert!(
            top.to_string().starts_with("duplicate member `sub`"),
            "{top}"
        );
        let nested = parse(br#"{"act":{"sub":"a","sub":"b"}}"#).unwrap_err();
        assert!(nested.to_string().contains(DUPLICATE), "{nested}");
        let in_array = parse(br#"{"keys":[{"kid":"1","kid":"2"}]}"#).unwrap_err();
        assert!(in_array.to_string().contains(DUPLICATE), "{in_array}");
        // serde_json itself keeps the last one: the reason this module exists.
        let lax: Value = serde_json::from_slice(br#"{"sub":"alice","sub":"admin"}"#).unwrap();
        assert_eq!(lax["sub"], "admin");
    }

    #[test]
    fn trailing_input_is_refused() {
        assert!(parse(br#"{"a":1} {"a":2}"#).is_err());
    }
}
