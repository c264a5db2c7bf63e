//! Property tests of the scheduler extender's request handling, through the handlers
//! themselves: any body (bytes, any JSON, ExtenderArgs-shaped JSON with any values in the
//! known fields) gets a 400 that says it is not ExtenderArgs, or an answer whose error, if
//! any, is one of the documented ones; well-formed args account for every candidate node.

use axum::body::Bytes;
use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::state::props::{catalog, one_free_gpu, one_node};

fn app() -> AppState {
    let (state, session, t) = one_node();
    state.apply_snapshot("n1", session, one_free_gpu(), t).expect("snapshot");
    let placement = Arc::new(crate::placement::Placement::new(state, Arc::new(catalog()), crate::placement::Params::default()));
    let auth = super::super::auth::RawAuth::default().resolve(true).expect("insecure auth");
    AppState { placement, auth, leadership: crate::leader::Leadership::always() }
}

/// Runs a handler to its response and reads the body.
fn call<F: std::future::Future<Output = Response>>(f: F) -> (StatusCode, Vec<u8>) {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    rt.block_on(async {
        let r = f.await;
        let status = r.status();
        let body = axum::body::to_bytes(r.into_body(), usize::MAX).await.expect("body");
        (status, body.to_vec())
    })
}

fn filter_call(body: &[u8]) -> (StatusCode, Vec<u8>) {
    call(filter(State(app()), Extension(ConnRole(None)), HeaderMap::new(), Bytes::copy_from_slice(body)))
}

fn prioritize_call(body: &[u8]) -> (StatusCode, Vec<u8>) {
    call(prioritize(State(app()), Extension(ConnRole(None)), HeaderMap::new(), Bytes::copy_from_slice(body)))
}

const NOT_ARGS: &str = "request body is not a kube-scheduler ExtenderArgs JSON object: ";
const NEITHER: &str = "ExtenderArgs has neither NodeNames nor Nodes";
const NO_NAME: &str = "a node in Nodes.items has no metadata.name";

/// Keys the parser and the pod/node lookups care about, and a stranger.
const KEYS: &[&str] = &[
    "Pod",
    "pod",
    "Nodes",
    "nodes",
    "NodeNames",
    "nodenames",
    "nodeNames",
    "metadata",
    "annotations",
    "labels",
    MODEL_KEY,
    "items",
    "name",
    "x",
];

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e9..1e9f64).prop_map(Value::from),
        prop::sample::select(vec!["gm", "mm", "unknown", "n1", "ghost", ""]).prop_map(Value::from),
        "\\PC{0,6}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(prop::sample::select(KEYS).prop_map(str::to_owned), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Bodies from the edges in: random bytes, any JSON, and ExtenderArgs-shaped objects whose
/// fields hold anything.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let shaped = prop::collection::btree_map(prop::sample::select(&KEYS[..7]).prop_map(str::to_owned), json(), 0..4)
        .prop_map(|m| Value::Object(m.into_iter().collect()));
    let name = || prop::sample::select(vec!["n1", "ghost", ""]).prop_map(Value::from);
    let model = prop::sample::select(vec!["gm", "mm", "nm", "unknown", ""]);
    let pod = prop_oneof![json(), model.prop_map(|m| json!({"metadata": {"annotations": {MODEL_KEY: m}}}))];
    let item = prop_oneof![json(), name().prop_map(|n| json!({"metadata": {"name": n}}))];
    let nodes = prop_oneof![json(), prop::collection::vec(item, 0..4).prop_map(|items| json!({"items": items}))];
    let names = prop_oneof![json(), prop::collection::vec(name(), 0..4).prop_map(Value::from)];
    let near =
        (prop::option::of(pod), prop::option::of(nodes), prop::option::of(names), any::<bool>()).prop_map(|(pod, nodes, names, go)| {
            let keys = if go { ["Pod", "Nodes", "NodeNames"] } else { ["pod", "nodes", "nodeNames"] };
            let fields = keys.into_iter().zip([pod, nodes, names]).filter_map(|(k, v)| Some((k.to_owned(), v?)));
            Value::Object(fields.collect())
        });
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => json().prop_map(|v| v.to_string().into_bytes()),
        2 => shaped.prop_map(|v| v.to_string().into_bytes()),
        4 => near.prop_map(|v| v.to_string().into_bytes()),
    ]
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn filter_answers_any_body_or_says_it_is_not_extender_args(body in body()) {
        let (status, out) = filter_call(&body);
        if status == StatusCode::BAD_REQUEST {
            prop_assert!(text(&out).starts_with(NOT_ARGS), "{}", text(&out));
            prop_assert!(serde_json::from_slice::<ExtenderArgs>(&body).is_err());
            return Ok(());
        }
        prop_assert_eq!(status, StatusCode::OK, "{}", text(&out));
        let v: Value = serde_json::from_slice(&out).expect("the answer is JSON");
        let error = v["Error"].as_str().expect("Error is a string");
        let known = error.is_empty()
            || error == NEITHER
            || error == NO_NAME
            || (error.starts_with("model ") && error.ends_with(" is not in the controller's catalog"));
        prop_assert!(known, "unexpected Error {:?}", error);
    }

    #[test]
    fn prioritize_scores_any_body_or_says_why_not(body in body()) {
        let (status, out) = prioritize_call(&body);
        match status {
            StatusCode::OK => {
                let scores: Vec<HostPriority> = serde_json::from_slice(&out).expect("a HostPriority list");
                prop_assert!(scores.iter().all(|s| (0..=10).contains(&s.score)), "{:?}", scores);
            }
            StatusCode::BAD_REQUEST => {
                let t = text(&out);
                prop_assert!(t.starts_with(NOT_ARGS) || t == format!("{NEITHER}\n") || t == format!("{NO_NAME}\n"), "{}", t);
            }
            StatusCode::NOT_FOUND => prop_assert!(text(&out).ends_with("is not in the controller's catalog\n"), "{}", text(&out)),
            other => prop_assert!(false, "status {}: {}", other, text(&out)),
        }
    }

    /// Every candidate comes back exactly once: feasible, failed, or failed for good (a
    /// node no agent reports), in either request mode.
    #[test]
    fn filter_accounts_for_every_candidate(
        names in prop::collection::btree_set(prop_oneof![Just("n1".to_owned()), "[a-z]{1,4}"], 0..6),
        model in prop::sample::select(vec!["gm", "mm", "nm"]),
        as_label in any::<bool>(),
        node_list in any::<bool>(),
    ) {
        let names: Vec<String> = names.into_iter().collect();
        let meta = if as_label { json!({"labels": {MODEL_KEY: model}}) } else { json!({"annotations": {MODEL_KEY: model}}) };
        let args = if node_list {
            let items: Vec<Value> = names.iter().map(|n| json!({"metadata": {"name": n}})).collect();
            json!({"Pod": {"metadata": meta}, "Nodes": {"items": items}})
        } else {
            json!({"Pod": {"metadata": meta}, "NodeNames": names})
        };
        let (status, out) = filter_call(args.to_string().as_bytes());
        prop_assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_slice(&out).expect("JSON");
        prop_assert_eq!(&v["Error"], "");
        let feasible: Vec<String> = if node_list {
            v["Nodes"]["items"].as_array().expect("items").iter().filter_map(|i| i["metadata"]["name"].as_str().map(str::to_owned)).collect()
        } else {
            serde_json::from_value(v["NodeNames"].clone()).expect("NodeNames")
        };
        let failed: Vec<String> = v["FailedNodes"].as_object().expect("map").keys().cloned().collect();
        let gone: Vec<String> = v["FailedAndUnresolvableNodes"].as_object().expect("map").keys().cloned().collect();
        let mut all: Vec<String> = feasible.iter().chain(&failed).chain(&gone).cloned().collect();
        all.sort();
        prop_assert_eq!(&all, &names);
        prop_assert!(gone.iter().all(|n| n != "n1"), "n1 is reported: {:?}", gone);
        // The node has one free H100 and nothing else: only the whole-GPU model fits.
        prop_assert_eq!(feasible.contains(&"n1".to_owned()), model == "gm" && names.contains(&"n1".to_owned()));
    }
}
