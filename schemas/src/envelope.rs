//! The envelope every event travels in.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Envelope {
    /// UUIDv7: unique, and ordered by creation time.
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// Sequence within the aggregate, from 1.
    pub version: i64,
    pub event_type: String,
    pub schema_version: u32,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
    #[schema(value_type = Object)]
    pub payload: Payload,
}

/// An envelope as read back from the log, with its place in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RecordedEvent {
    /// The log position: ascending over the whole log.
    pub position: i64,
    #[serde(flatten)]
    pub envelope: Envelope,
}

/// An event's payload as the log holds it: JSON text, checked to be JSON (nested at
/// most [`MAX_DEPTH`] deep, as a [`Value`] can be) when it is made. [`crate::decode`] reads the event straight from the text, without building a
/// tree of [`Value`]s first (most of the cost of reading an event, and reading
/// events is most of a consumer's work); [`Payload::to_value`] builds that tree for
/// the few readers that want one. It serializes as the JSON it holds.
#[derive(Debug, Clone)]
pub struct Payload(Box<RawValue>);

impl Payload {
    /// The payload whose JSON text is `text`; an error if it is not JSON.
    pub fn from_text(text: String) -> Result<Payload, serde_json::Error> {
        if depth(&text) > MAX_DEPTH {
            return Err(serde::de::Error::custom(format!(
                "nested deeper than {MAX_DEPTH}"
            )));
        }
        RawValue::from_string(text).map(Payload)
    }

    pub fn from_value(value: &Value) -> Payload {
        // A `Value` always serializes (its keys are strings, its numbers finite).
        Payload(
            serde_json::value::to_raw_value(value).unwrap_or_else(|_| RawValue::NULL.to_owned()),
        )
    }

    /// The JSON text.
    pub fn text(&self) -> &str {
        self.0.get()
    }

    pub fn raw(&self) -> &RawValue {
        &self.0
    }

    pub fn to_value(&self) -> Value {
        // The text was checked to be JSON, no deeper than a `Value` reads, when the
        // payload was made.
        serde_json::from_str(self.0.get()).unwrap_or(Value::Null)
    }
}

/// How deep [`serde_json`] reads JSON into a [`Value`] (its recursion limit).
pub const MAX_DEPTH: usize = 127;

/// How deep the arrays and objects of JSON `text` nest (brackets inside strings not
/// counted). `RawValue`'s own check has no limit.
fn depth(text: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for byte in text.bytes() {
        match (in_string, escaped, byte) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (true, false, _) => {}
            (false, _, b'"') => in_string = true,
            (false, _, b'[' | b'{') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (false, _, b']' | b'}') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

impl From<Value> for Payload {
    fn from(value: Value) -> Payload {
        Payload::from_value(&value)
    }
}

/// Two payloads are equal when they hold the same JSON, however it is spaced or its
/// keys ordered.
impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        self.text() == other.text() || self.to_value() == other.to_value()
    }
}

impl PartialEq<Value> for Payload {
    fn eq(&self, other: &Value) -> bool {
        self.to_value() == *other
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

/// Read through a [`Value`]: an envelope is flattened into [`RecordedEvent`], and
/// serde hands a flattened field a buffered copy that a `RawValue` cannot borrow
/// from.
impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Payload, D::Error> {
        Value::deserialize(deserializer).map(|value| Payload::from_value(&value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> String {
        format!("{}\"[{{\\\"\"{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn a_payload_is_as_deep_as_a_value_reads_at_most() {
        let deepest = Payload::from_text(nested(MAX_DEPTH)).expect("as deep as a Value reads");
        assert_ne!(deepest.to_value(), Value::Null);
        let error = Payload::from_text(nested(MAX_DEPTH + 1)).expect_err("deeper");
        assert!(error.to_string().contains("nested deeper"), "{error}");
        assert!(Payload::from_text("{\"a\": [1, 2".into()).is_err());
    }
}
