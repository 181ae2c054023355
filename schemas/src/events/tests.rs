use super::*;
use crate::Envelope;
use domain::cart::CartEvent;
use domain::customer::SessionEnd;
use domain::order::OrderLine;
use domain::product::ProductEvent;
use domain::{CancelReason, CustomerId, Email, Money, PaymentToken, Quantity, Sku};
use std::collections::BTreeMap;
use std::path::PathBuf;
use uuid::Uuid;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_json(path: PathBuf) -> Value {
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn line(sku: &str, quantity: i64, price: i64) -> OrderLine {
    OrderLine {
        sku: Sku::parse(sku).expect("valid"),
        quantity: Quantity::new(quantity).expect("valid"),
        unit_price_cents: Money::unit_price(price).expect("valid"),
    }
}

/// At least one sample of every event the code can emit, covering optional fields.
fn samples() -> Vec<(&'static str, Value, String)> {
    let order = Uuid::from_u128(0x0190_a0e4_1f00_7000_8000_0000_0000_00aa);
    let mut out = vec![];
    let mut push = |aggregate: &'static str, encoded: Result<(String, u32, Value), SchemaError>| {
        let (event_type, version, payload) = encoded.expect("encodes");
        assert_eq!(Some(version), current_version(&event_type));
        out.push((aggregate, payload, event_type));
    };
    let token = PaymentToken::parse("tok_ok").expect("valid");
    for event in [
        OrderEvent::OrderPlaced {
            customer_id: CustomerId::parse("c-1").expect("valid"),
            lines: vec![line("S-1", 2, 1299), line("S-2", 1, 0)],
            total_cents: Money::from_cents(2598),
            payment_token: token.clone(),
        },
        OrderEvent::OrderConfirmed {},
        OrderEvent::OrderCancelled {
            reason: CancelReason::CustomerRequest,
            note: Some("changed my mind".into()),
        },
        OrderEvent::OrderCancelled {
            reason: CancelReason::PaymentTimeout,
            note: None,
        },
        OrderEvent::OrderShipped {},
        OrderEvent::OrderDelivered {},
    ] {
        push("order", encode(&event));
    }
    for event in [
        InventoryEvent::StockRestocked {
            quantity: 10,
            on_hand: 10,
            reserved: 0,
        },
        InventoryEvent::StockReserved {
            order_id: order,
            quantity: 2,
            on_hand: 10,
            reserved: 2,
        },
        InventoryEvent::StockReservationRejected {
            order_id: order,
            requested: 20,
            available: 8,
        },
        InventoryEvent::StockReleased {
            order_id: order,
            quantity: 2,
            on_hand: 10,
            reserved: 0,
        },
        InventoryEvent::StockCommitted {
            order_id: order,
            quantity: 2,
            on_hand: 8,
            reserved: 0,
        },
    ] {
        push("inventory", encode(&event));
    }
    for event in [
        PaymentEvent::PaymentRequested {
            amount_cents: Money::from_cents(2598),
            payment_token: token.clone(),
        },
        PaymentEvent::PaymentAuthorized {
            amount_cents: Money::from_cents(2598),
        },
        PaymentEvent::PaymentDeclined {
            reason: "card declined".into(),
        },
        PaymentEvent::PaymentCaptured {
            amount_cents: Money::from_cents(2598),
        },
        PaymentEvent::PaymentVoided {
            amount_cents: Money::ZERO,
        },
    ] {
        push("payment", encode(&event));
    }
    for event in [
        ShipmentEvent::ShipmentCreated {},
        ShipmentEvent::ShipmentDispatched {},
        ShipmentEvent::ShipmentDelivered {},
        ShipmentEvent::ShipmentCancelled {},
    ] {
        push("shipment", encode(&event));
    }
    push(
        "customer",
        encode(&CustomerEvent::CustomerRegistered {
            email: Email::parse("ada@example.com").expect("valid"),
            name: "Ada Lovelace".into(),
            password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo".into(),
        }),
    );
    push(
        "customer",
        encode(&CustomerEvent::CustomerRenamed {
            name: "Ada King".into(),
        }),
    );
    let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    for event in [
        SessionEvent::SessionStarted {
            customer_id: "0190a0e4-1f00-5000-8000-0000000000cc".into(),
            refresh_token_digest: digest.into(),
        },
        SessionEvent::SessionRefreshed {
            refresh_token_digest: digest.into(),
        },
        SessionEvent::SessionEnded {
            reason: SessionEnd::Logout,
        },
        SessionEvent::SessionEnded {
            reason: SessionEnd::Reuse,
        },
    ] {
        push("session", encode(&event));
    }
    push(
        "product",
        encode(&ProductEvent::ProductCreated {
            name: "Green tea".into(),
            description: "Loose leaves, 100 g".into(),
            price_cents: Money::from_cents(450),
        }),
    );
    push(
        "product",
        encode(&ProductEvent::ProductChanged {
            name: "Green tea".into(),
            description: String::new(),
            price_cents: Money::from_cents(500),
            active: false,
        }),
    );
    let sku = Sku::parse("TEA-1").expect("valid");
    for event in [
        CartEvent::CartLineSet {
            sku: sku.clone(),
            quantity: Quantity::new(2).expect("valid"),
        },
        CartEvent::CartLineRemoved { sku: sku.clone() },
        CartEvent::CartCheckedOut {
            order_id: order,
            lines: vec![line("TEA-1", 2, 450)],
            total_cents: Money::from_cents(900),
            payment_token: token.clone(),
        },
    ] {
        push("cart", encode(&event));
    }
    out
}

fn schema(event_type: &str, version: u32) -> Value {
    read_json(root().join(format!("events/{event_type}.v{version}.json")))
}

fn violations(schema: &Value, instance: &Value) -> Vec<String> {
    let validator = jsonschema::validator_for(schema).expect("schema compiles");
    validator
        .iter_errors(instance)
        .map(|error| format!("{error} at {}", error.instance_path))
        .collect()
}

#[test]
fn every_event_type_has_a_sample_and_a_schema_for_each_version() {
    let sampled: Vec<String> = samples().into_iter().map(|(_, _, t)| t).collect();
    for (_, event_type, current) in EVENT_TYPES {
        assert!(
            sampled.iter().any(|t| t == event_type),
            "no sample of {event_type}"
        );
        for version in 1..=*current {
            let path = root().join(format!("events/{event_type}.v{version}.json"));
            assert!(path.exists(), "missing schema file {}", path.display());
        }
    }
}

#[test]
fn every_schema_file_belongs_to_a_known_event_version() {
    for entry in std::fs::read_dir(root().join("events")).expect("events folder") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        let (event_type, rest) = name.split_once(".v").expect("name is <Type>.v<N>.json");
        let version: u32 = rest
            .trim_end_matches(".json")
            .parse()
            .expect("version number");
        let current = current_version(event_type)
            .unwrap_or_else(|| panic!("{name} names no known event type"));
        assert!(
            version <= current,
            "{name} is newer than the code's version {current}"
        );
    }
}

#[test]
fn every_event_the_code_can_emit_fits_its_schema() {
    for (aggregate, payload, event_type) in samples() {
        let version = current_version(&event_type).expect("known");
        let errors = violations(&schema(&event_type, version), &payload);
        assert!(
            errors.is_empty(),
            "{aggregate}/{event_type} v{version} does not fit its schema: {errors:?}\npayload: {payload}"
        );
    }
}

/// The golden wire form of every sample. When this fails, an event's shape changed:
/// give the event a new schema version, a schema file and an upcaster; then refresh
/// the file with `ORDERLINE_UPDATE_WIRE=1 cargo test -p schemas`.
#[test]
fn the_wire_shape_of_an_event_changes_only_with_a_new_version() {
    let path = root().join("fixtures/wire.json");
    let mut current: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (_, payload, event_type) in samples() {
        let version = current_version(&event_type).expect("known");
        current
            .entry(format!("{event_type}.v{version}"))
            .or_default()
            .push(payload);
    }
    let current = serde_json::to_value(&current).expect("serializes");
    if std::env::var_os("ORDERLINE_UPDATE_WIRE").is_some() {
        let text = serde_json::to_string_pretty(&current).expect("serializes");
        std::fs::write(&path, text + "\n").expect("writes the golden file");
    }
    let golden = read_json(path);
    let (Some(golden), Some(current)) = (golden.as_object(), current.as_object()) else {
        panic!("golden file is not an object");
    };
    for (key, payloads) in current {
        match golden.get(key) {
            Some(expected) => assert_eq!(
                expected, payloads,
                "the wire shape of {key} changed without a new schema version"
            ),
            None => panic!("{key} is new: refresh fixtures/wire.json (see this test's doc)"),
        }
    }
}

#[test]
fn every_event_decodes_to_what_was_encoded() {
    for (aggregate, payload, event_type) in samples() {
        let version = current_version(&event_type).expect("known");
        let envelope = Envelope {
            event_id: Uuid::nil(),
            aggregate_type: aggregate.into(),
            aggregate_id: "x".into(),
            version: 1,
            event_type: event_type.clone(),
            schema_version: version,
            occurred_at: chrono::DateTime::UNIX_EPOCH,
            correlation_id: Uuid::nil(),
            causation_id: Uuid::nil(),
            payload: payload.clone().into(),
        };
        let event = AnyEvent::from_envelope(&envelope).expect("decodes");
        let again = event.encode().expect("encodes");
        assert_eq!(again.2, payload, "{event_type} does not round-trip");
    }
}

#[test]
fn stored_v1_order_placed_events_are_upcast_with_their_total() {
    let fixtures: Vec<Envelope> =
        serde_json::from_value(read_json(root().join("fixtures/OrderPlaced.v1.json")))
            .expect("fixtures are envelopes");
    assert_eq!(fixtures.len(), 2);
    let v1 = schema("OrderPlaced", 1);
    let mut totals = vec![];
    for envelope in &fixtures {
        assert_eq!(envelope.schema_version, 1);
        assert!(violations(&v1, &envelope.payload.to_value()).is_empty());
        match AnyEvent::from_envelope(envelope).expect("v1 stays readable") {
            AnyEvent::Order(OrderEvent::OrderPlaced {
                total_cents, lines, ..
            }) => {
                assert_eq!(total_cents, domain::order::total_of(&lines));
                totals.push(total_cents.cents());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(totals, vec![2 * 1299 + 3 * 250, 0]);
}

#[test]
fn an_unknown_version_or_type_is_refused_with_a_clear_error() {
    let error =
        decode::<OrderEvent>("OrderPlaced", 3, &json!({}).into()).expect_err("v3 is unknown");
    assert!(error.to_string().contains("no schema version 3"), "{error}");
    let error =
        decode::<OrderEvent>("OrderExploded", 1, &json!({}).into()).expect_err("unknown type");
    assert!(error.to_string().contains("unknown event type"), "{error}");
    let error = decode::<OrderEvent>("OrderPlaced", 2, &json!({"customer_id": 5}).into())
        .expect_err("bad payload");
    assert!(error.to_string().contains("does not fit"), "{error}");
}

#[test]
fn a_placed_order_of_no_lines_or_too_many_is_refused_when_read() {
    let line = json!({"sku": "S-1", "quantity": 1, "unit_price_cents": 100});
    for count in [0, 101] {
        let payload = json!({
            "customer_id": "c-1",
            "lines": vec![line.clone(); count],
            "total_cents": 100 * count,
            "payment_token": "tok_ok",
        });
        let error = decode::<OrderEvent>("OrderPlaced", 2, &payload.into())
            .expect_err("an order holds 1 to 100 lines");
        assert!(error.to_string().contains("1 to 100 lines"), "{error}");
    }
    let payload = json!({
        "customer_id": "c-1",
        "lines": [line],
        "total_cents": 100,
        "payment_token": "tok_ok",
    });
    decode::<OrderEvent>("OrderPlaced", 2, &payload.into()).expect("one line is an order");
}

#[test]
fn envelopes_fit_the_envelope_schema() {
    let schema = read_json(root().join("envelope.json"));
    let fixtures = read_json(root().join("fixtures/OrderPlaced.v1.json"));
    for envelope in fixtures.as_array().expect("array") {
        assert!(violations(&schema, envelope).is_empty());
    }
}

mod decoders {
    //! The envelope decoder under arbitrary input: whatever a log or a topic holds, it
    //! answers with an event or an error (which the consumers dead-letter), never a
    //! panic; and what it accepts is an event the code could have written.
    use super::*;
    use crate::RecordedEvent;
    use proptest::prelude::*;

    /// Any JSON value, nested a few levels.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            "\\PC{0,12}".prop_map(Value::from),
            Just(Value::from("tok_ok")),
            Just(Value::from("0190a0e4-1f00-7000-8000-0000000000aa")),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("[a-z_]{1,16}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A sample event's envelope as JSON, with a field of its payload replaced,
    /// removed or added, and its type, version and aggregate sometimes changed.
    fn mutated_envelope() -> impl Strategy<Value = Value> {
        let samples = samples();
        let count = samples.len();
        (
            0..count,
            any::<prop::sample::Index>(),
            0..4u8,
            any_json(),
            0..4u32,
            proptest::option::of(prop::sample::select(vec![
                "order",
                "inventory",
                "payment",
                "shipment",
                "",
                "Order",
            ])),
        )
            .prop_map(move |(i, field, how, value, version, aggregate)| {
                let (sample_aggregate, mut payload, event_type) = samples[i].clone();
                if let Some(fields) = payload.as_object_mut() {
                    let names: Vec<String> = fields.keys().cloned().collect();
                    match (how, names.is_empty()) {
                        (0, false) => {
                            fields.insert(names[field.index(names.len())].clone(), value);
                        }
                        (1, false) => {
                            fields.remove(&names[field.index(names.len())]);
                        }
                        (2, _) => {
                            fields.insert("unexpected".into(), value);
                        }
                        _ => payload = value,
                    }
                }
                json!({
                    "position": 1,
                    "event_id": "0190a0e4-1f00-7000-8000-000000000001",
                    "aggregate_type": aggregate.unwrap_or(sample_aggregate),
                    "aggregate_id": "a-1",
                    "version": 1,
                    "event_type": event_type,
                    "schema_version": version,
                    "occurred_at": "2026-01-01T00:00:00Z",
                    "correlation_id": "0190a0e4-1f00-7000-8000-000000000002",
                    "causation_id": "0190a0e4-1f00-7000-8000-000000000003",
                    "payload": payload,
                })
            })
    }

    /// Decode `bytes` as a consumer does: the envelope, then the event in it. Any
    /// event accepted is checked against the schema of what it re-encodes to.
    fn decode_record(bytes: &[u8]) -> Result<(), String> {
        let recorded: RecordedEvent = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let event = AnyEvent::from_envelope(&recorded.envelope).map_err(|e| e.to_string())?;
        let (event_type, version, payload) = event.encode().map_err(|e| e.to_string())?;
        let problems = violations(&schema(&event_type, version), &payload);
        assert!(
            problems.is_empty(),
            "{event_type} decoded from {} re-encodes outside its schema: {problems:?}",
            String::from_utf8_lossy(bytes)
        );
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_bytes_are_an_error_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_record(&bytes);
        }

        #[test]
        fn arbitrary_json_is_an_error_never_a_panic(value in any_json()) {
            let _ = decode_record(value.to_string().as_bytes());
        }

        #[test]
        fn damaged_envelopes_are_an_error_or_a_valid_event_never_a_panic(envelope in mutated_envelope()) {
            let _ = decode_record(envelope.to_string().as_bytes());
        }

        #[test]
        fn a_truncated_envelope_is_an_error(cut in 0usize..400) {
            let (aggregate, payload, event_type) = samples().remove(0);
            let whole = json!({
                "position": 1, "event_id": "0190a0e4-1f00-7000-8000-000000000001",
                "aggregate_type": aggregate, "aggregate_id": "a-1", "version": 1,
                "event_type": event_type, "schema_version": 2,
                "occurred_at": "2026-01-01T00:00:00Z",
                "correlation_id": "0190a0e4-1f00-7000-8000-000000000002",
                "causation_id": "0190a0e4-1f00-7000-8000-000000000003", "payload": payload,
            })
            .to_string();
            prop_assume!(cut < whole.len());
            prop_assert!(decode_record(&whole.as_bytes()[..cut]).is_err());
        }
    }
}
