//! A bounded fuzz harness for the inbound decoder: every frame an orchestrator (or anything
//! pretending to be one) can send is decoded without a panic, and a frame that decodes keeps
//! its ids. Fixed case counts, so it runs in CI with the stable toolchain like any test.

use kici_agent_core::protocol::{parse_inbound, Inbound};
use proptest::prelude::*;
use serde_json::{json, Value};

/// Arbitrary JSON values, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            prop::collection::btree_map("[a-zA-Z]{1,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The message types the agent knows, plus nonsense.
fn message_type() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("job.dispatch".to_owned()),
        Just("job.cancel".to_owned()),
        Just("register.ack".to_owned()),
        Just("auth.success".to_owned()),
        Just("auth.failure".to_owned()),
        Just("rate.limit.warning".to_owned()),
        Just("heartbeat".to_owned()),
        Just("fleet.logs.request".to_owned()),
        "[a-z.]{0,20}",
    ]
}

/// A real dispatch (the recorded fixture) with one field replaced by an arbitrary value.
fn mutated_dispatch() -> impl Strategy<Value = String> {
    let fixture: Value = serde_json::from_str(include_str!(
        "../../tests/fixtures/real-orchestrator/job.dispatch.json"
    ))
    .expect("the fixture is JSON");
    let fields: Vec<String> = fixture
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    (prop::sample::select(fields), json_value()).prop_map(move |(field, value)| {
        let mut dispatch = fixture.clone();
        dispatch[field.as_str()] = value;
        dispatch.to_string()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,200}") {
        let _ = parse_inbound(&text);
    }

    #[test]
    fn arbitrary_bytes_as_lossy_text_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse_inbound(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn typed_objects_with_arbitrary_fields_never_panic(
        kind in message_type(),
        body in prop::collection::btree_map("[a-zA-Z]{1,12}", json_value(), 0..10),
    ) {
        let mut object: serde_json::Map<String, Value> = body.into_iter().collect();
        object.insert("type".into(), Value::from(kind));
        let _ = parse_inbound(&Value::Object(object).to_string());
    }

    #[test]
    fn a_mutated_real_dispatch_never_panics_and_keeps_its_ids(text in mutated_dispatch()) {
        if let Ok(Inbound::JobDispatch(dispatch)) = parse_inbound(&text) {
            let value: Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(json!(dispatch.job_id), value["jobId"].clone());
            prop_assert_eq!(json!(dispatch.run_id), value["runId"].clone());
        }
    }
}

#[test]
fn deep_nesting_is_refused_without_a_stack_overflow() {
    for depth in [1_000, 100_000] {
        let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(parse_inbound(&text).is_err());
        let text = format!(
            "{{\"type\":\"job.dispatch\",\"x\":{}{}}}",
            "{\"a\":".repeat(depth),
            "}".repeat(depth)
        );
        assert!(parse_inbound(&text).is_err());
    }
}
