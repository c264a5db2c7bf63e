//! Property tests of KEDA's external scaler requests: for any trigger metadata, every
//! handler answers for a catalog model, says NotFound for another name, and says
//! InvalidArgument naming the ScaledObject when `model` is missing or empty.

use std::collections::HashMap;

use keda::external_scaler_server::ExternalScaler as _;
use proptest::prelude::*;
use tonic::Code;

use super::*;
use crate::state::props::{catalog, one_free_gpu, one_node};

fn service() -> KedaService {
    let (state, session, t) = one_node();
    state.apply_snapshot("n1", session, one_free_gpu(), t).expect("snapshot");
    let placement = Arc::new(Placement::new(state, Arc::new(catalog()), crate::placement::Params::default()));
    let scaling = Scaling::new(placement, crate::scaling::Settings::default(), &mut prometheus_client::registry::Registry::default());
    let auth = super::super::auth::RawAuth::default().resolve(true).expect("insecure auth");
    KedaService::new(Arc::new(scaling), auth)
}

fn metadata() -> impl Strategy<Value = HashMap<String, String>> {
    let key = prop_oneof![4 => Just("model".to_owned()), 1 => prop::sample::select(vec!["Model", "models", " model", ""]).prop_map(str::to_owned), 1 => "\\PC{0,6}"];
    let value =
        prop_oneof![4 => prop::sample::select(vec!["gm", "mm", "nm", "", "unknown", "gm "]).prop_map(str::to_owned), 1 => "\\PC{0,12}"];
    prop::collection::hash_map(key, value, 0..4)
}

fn scaled_object() -> impl Strategy<Value = keda::ScaledObjectRef> {
    ("[a-z0-9-]{0,8}", "\\PC{0,8}", metadata()).prop_map(|(name, namespace, scaler_metadata)| keda::ScaledObjectRef {
        name,
        namespace,
        scaler_metadata,
    })
}

/// What every handler must do with `r`'s metadata.
fn check<T: std::fmt::Debug>(r: &keda::ScaledObjectRef, got: Result<T, Status>) -> Result<(), TestCaseError> {
    let model = r.scaler_metadata.get("model").filter(|m| !m.is_empty());
    match (model.map(String::as_str), got) {
        (Some("gm" | "mm" | "nm"), Ok(_)) => {}
        (Some(m), Err(s)) if !["gm", "mm", "nm"].contains(&m) => {
            prop_assert_eq!(s.code(), Code::NotFound);
            prop_assert!(s.message().contains(&format!("{m:?}")), "{}", s.message());
        }
        (None, Err(s)) => {
            prop_assert_eq!(s.code(), Code::InvalidArgument);
            let named = format!("ScaledObject {}/{}: trigger metadata needs `model: ", r.namespace, r.name);
            prop_assert!(s.message().starts_with(&named), "{}", s.message());
        }
        (m, got) => prop_assert!(false, "model {:?}: {:?}", m, got),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn any_trigger_metadata_gets_an_answer_or_a_clear_status(r in scaled_object(), metric_name in prop_oneof![Just(String::new()), "\\PC{0,8}"]) {
        let svc = service();
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        rt.block_on(async {
            check(&r, svc.is_active(Request::new(r.clone())).await)?;
            check(&r, svc.get_metric_spec(Request::new(r.clone())).await)?;
            let req = keda::GetMetricsRequest { scaled_object_ref: Some(r.clone()), metric_name: metric_name.clone() };
            let got = svc.get_metrics(Request::new(req)).await;
            if let Ok(resp) = &got {
                let values = &resp.get_ref().metric_values;
                prop_assert_eq!(values.len(), 1);
                let want = if metric_name.is_empty() { metric_name_of(&r) } else { metric_name.clone() };
                prop_assert_eq!(&values[0].metric_name, &want);
            }
            check(&r, got)?;
            // The stream's first answer is the same check as IsActive.
            check(&r, svc.stream_is_active(Request::new(r.clone())).await.map(|_| ()))?;
            Ok(())
        })?;
    }
}

fn metric_name_of(r: &keda::ScaledObjectRef) -> String {
    metric_name(r.scaler_metadata.get("model").map_or("", String::as_str))
}

#[test]
fn get_metrics_without_a_scaled_object_is_invalid() {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let got = rt.block_on(service().get_metrics(Request::new(keda::GetMetricsRequest::default())));
    let s = got.expect_err("no scaledObjectRef");
    assert_eq!((s.code(), s.message()), (Code::InvalidArgument, "GetMetricsRequest.scaledObjectRef is required"));
}
