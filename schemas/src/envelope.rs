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

// On the wire the envelope's fields are beside `position`, in one object.
/// An envelope as read back from the log, with its place in it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct RecordedEvent {
    /// The log position: ascending over the whole log.
    pub position: i64,
    #[serde(flatten)]
    pub envelope: Envelope,
}

/// An event's payload as the log holds it: JSON text, checked to be JSON (nested at
/// most [`MAX_DEPTH`] deep, as a [`Value`] can be) when it is made.
/// [`crate::decode`] reads the event straight from the text, without building a
/// tree of [`Value`]s first (most of the cost of reading an event, and reading
/// events is most of a consumer's work); [`Payload::to_value`] builds that tree for
/// the few readers that want one. It serializes as the JSON it holds.
#[derive(Debug, Clone)]
pub struct Payload(Box<RawValue>);

impl Payload {
    /// The payload whose JSON text is `text`; an error if it is not JSON.
    pub fn from_text(text: String) -> Result<Payload, serde_json::Error> {
        RawValue::from_string(text).and_then(Payload::within_depth)
    }

    /// JSON text as a payload, if it nests no deeper than a [`Value`] reads.
    fn within_depth<E: serde::de::Error>(raw: Box<RawValue>) -> Result<Payload, E> {
        match too_deep(raw.get()) {
            true => Err(E::custom(format!("nested deeper than {MAX_DEPTH}"))),
            false => Ok(Payload(raw)),
        }
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

/// Whether the arrays and objects of JSON `text` nest deeper than [`MAX_DEPTH`]. It
/// nests at most as deep as it has opening brackets, counted first (far less work
/// than following its strings, which most payloads are spared).
fn too_deep(text: &str) -> bool {
    let opening = text.bytes().filter(|b| matches!(b, b'[' | b'{')).count();
    opening > MAX_DEPTH && depth(text) > MAX_DEPTH
}

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

/// Read as the JSON text it is (from serde_json's readers of text, and of a
/// [`Value`]), checked as [`Payload::from_text`] checks it. Neither another format
/// nor serde's buffering (`#[serde(flatten)]`, untagged or internally tagged enums)
/// can hand over a `RawValue`: nothing that holds a payload is read through them.
impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Payload, D::Error> {
        Box::<RawValue>::deserialize(deserializer).and_then(Payload::within_depth)
    }
}

/// Read field by field, not through `#[serde(flatten)]`: a flattened envelope would
/// be buffered whole first, and its payload read into a tree of [`Value`]s and
/// written back to text.
impl<'de> Deserialize<'de> for RecordedEvent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RecordedEvent, D::Error> {
        #[derive(Deserialize)]
        struct Flat {
            position: i64,
            event_id: Uuid,
            aggregate_type: String,
            aggregate_id: String,
            version: i64,
            event_type: String,
            schema_version: u32,
            occurred_at: DateTime<Utc>,
            correlation_id: Uuid,
            causation_id: Uuid,
            payload: Payload,
        }
        let flat = Flat::deserialize(deserializer)?;
        Ok(RecordedEvent {
            position: flat.position,
            envelope: Envelope {
                event_id: flat.event_id,
                aggregate_type: flat.aggregate_type,
                aggregate_id: flat.aggregate_id,
                version: flat.version,
                event_type: flat.event_type,
                schema_version: flat.schema_version,
                occurred_at: flat.occurred_at,
                correlation_id: flat.correlation_id,
                causation_id: flat.causation_id,
                payload: flat.payload,
            },
        })
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
        let read = |payload: &str| {
            serde_json::from_str::<Payload>(payload).map_err(|error| error.to_string())
        };
        assert!(read(&nested(MAX_DEPTH)).is_ok());
        let error = read(&nested(MAX_DEPTH + 1)).expect_err("deeper");
        assert!(error.contains("nested deeper"), "{error}");
    }

    /// A recorded event reads back from its own JSON (from text, and from a tree of
    /// values) with its payload's text as it was written, and a record that lacks a
    /// field or holds a payload that is not JSON does not read.
    #[test]
    fn a_recorded_event_reads_back_from_its_json() {
        let event = RecordedEvent {
            position: 7,
            envelope: Envelope {
                event_id: Uuid::from_u128(1),
                aggregate_type: "order".into(),
                aggregate_id: "o-1".into(),
                version: 2,
                event_type: "OrderPlaced".into(),
                schema_version: 1,
                occurred_at: DateTime::from_timestamp(1_700_000_000, 5_000).expect("time"),
                correlation_id: Uuid::from_u128(2),
                causation_id: Uuid::from_u128(3),
                payload: Payload::from_text(r#"{"b": [1, {"c": "\u0041"}], "a": 2.5}"#.into())
                    .expect("payload"),
            },
        };
        let text = serde_json::to_string(&event).expect("to JSON");
        let read: RecordedEvent = serde_json::from_str(&text).expect("from text");
        assert_eq!(read, event);
        assert_eq!(read.envelope.payload.text(), event.envelope.payload.text());
        let tree: Value = serde_json::from_str(&text).expect("a tree");
        assert_eq!(
            serde_json::from_value::<RecordedEvent>(tree.clone()).expect("from a tree"),
            event
        );
        let mut lacking = tree.clone();
        if let Some(fields) = lacking.as_object_mut() {
            fields.remove("version");
        }
        assert!(serde_json::from_value::<RecordedEvent>(lacking).is_err());
        let broken = text.replace(r#""a": 2.5}"#, r#""a": 2.5"#);
        assert!(serde_json::from_str::<RecordedEvent>(&broken).is_err());
        let payload = event.envelope.payload.text();
        assert!(text.contains(payload), "{text}");
        let deep = text.replace(payload, &nested(MAX_DEPTH + 1));
        let error = serde_json::from_str::<RecordedEvent>(&deep).expect_err("too deep");
        assert!(error.to_string().contains("nested deeper"), "{error}");
        let deepest = text.replace(payload, &nested(MAX_DEPTH));
        assert!(serde_json::from_str::<RecordedEvent>(&deepest).is_ok());
    }
}
