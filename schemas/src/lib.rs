//! What travels between the parts of Orderline and its clients: the event envelope,
//! the versioned wire form of every event (with upcasters for old versions), topic
//! names, and the HTTP request and response bodies.
//!
//! `events` turns domain events into (event type, schema version, JSON payload) and
//! back; one JSON Schema per event type and version is checked in under
//! `schemas/events/`, and the tests hold the code to them.

pub mod commands;
pub mod envelope;
pub mod events;
pub mod http;
pub mod topics;

pub use envelope::{Envelope, Payload, RecordedEvent};
pub use events::{decode, encode, AnyEvent, SchemaError};

/// Fields of event payloads that hold secrets (ADR 13): kept in the log, never
/// shown by a read API. Password hashes and refresh-token digests are not the
/// secrets themselves, but they are what an attacker would start from.
pub const SECRET_FIELDS: [&str; 3] = ["payment_token", "password_hash", "refresh_token_digest"];

/// What a read API shows in place of a secret.
pub const REDACTED: &str = "[redacted]";

/// [`redact_secrets`] of an event's payload (read as a tree only when its text names
/// a secret field, or holds an escape that could spell one).
pub fn redact_payload(payload: &mut Payload) {
    let text = payload.text();
    if text.contains("\\u") || SECRET_FIELDS.iter().any(|field| text.contains(field)) {
        let mut value = payload.to_value();
        redact_secrets(&mut value);
        *payload = Payload::from_value(&value);
    }
}

/// Replace the value of every secret field in `value`, at any depth, with
/// [`REDACTED`].
pub fn redact_secrets(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(fields) => {
            for (name, field) in fields.iter_mut() {
                if SECRET_FIELDS.contains(&name.as_str()) {
                    *field = serde_json::Value::String(REDACTED.into());
                } else {
                    redact_secrets(field);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_secrets),
        _ => {}
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_at_any_depth_and_nothing_else_changes() {
        let mut value = serde_json::json!({
            "payment_token": "tok_1",
            "event": {"payload": {"payment_token": "tok_2", "amount_cents": 5}},
            "list": [{"payment_token": "tok_3"}, "payment_token"],
        });
        redact_secrets(&mut value);
        assert_eq!(
            value,
            serde_json::json!({
                "payment_token": REDACTED,
                "event": {"payload": {"payment_token": REDACTED, "amount_cents": 5}},
                "list": [{"payment_token": REDACTED}, "payment_token"],
            })
        );
    }

    #[test]
    fn a_payload_is_redacted_even_with_its_keys_spelled_in_escapes() {
        for text in [
            r#"{"payment_token":"tok_1","amount_cents":5}"#,
            r#"{"payment\u005ftoken":"tok_1","amount_cents":5}"#,
        ] {
            let mut payload = Payload::from_text(text.into()).expect("json");
            redact_payload(&mut payload);
            assert_eq!(
                payload.to_value(),
                serde_json::json!({"payment_token": REDACTED, "amount_cents": 5}),
                "{text}"
            );
        }
        let mut plain = Payload::from_text(r#"{"amount_cents":5}"#.into()).expect("json");
        redact_payload(&mut plain);
        assert_eq!(plain.text(), r#"{"amount_cents":5}"#);
    }
}
