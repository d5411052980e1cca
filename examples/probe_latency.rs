use std::sync::Arc;
use std::time::{Duration, Instant};
use fusebox::store::{Store, RedisStore, AdmitRequest, Admission, Settle, FeatureSpec, TargetSpec};
use fusebox::*;
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rc = RedisConfig { url: Some("redis://127.0.0.1:6399/".into()), timeout: Duration::from_secs(2), ..Default::default() };
    let store = RedisStore::connect(&rc).await.unwrap();
    let t = Arc::new(TargetSpec { name: "m".into(), keys: fusebox::keys::target_keys("x", "m"), params: fusebox::breaker::BreakerParams::from_config(&BreakerConfig::default(), 86400000) });
    let f = Arc::new(FeatureSpec { name: "f".into(), keys: fusebox::keys::feature_keys("x", "f"), bulkhead: Some(fusebox::bulkhead::BulkheadParams{limit: 100000, lease_ms: 30000}), rate: None });
    for mode in 0..3 {
        let n = 3000;
        let start = Instant::now();
        for i in 0..n {
            let id = format!("c{mode}-{i}");
            let a = store.admit(AdmitRequest { target: &t, feature: &f, call_id: &id }).await.unwrap();
            if mode >= 1 {
                if let Admission::Admitted(a) = a {
                    let s = Settle { target: t.clone(), feature: f.clone(), call_id: id, generation: a.generation, probe: a.probe, permit: a.permit, refund_rate: false, outcome: CallOutcome::Success, elapsed_ms: 0 };
                    if mode == 1 { store.settle(&[s]).await.unwrap(); }
                }
            }
        }
        println!("mode {mode}: {:?} per op", start.elapsed() / n);
    }
    let c = Coordinator::new(Config { redis: Some(rc.clone()), features: [("f".to_string(), FeatureConfig { max_concurrent: Some(100000), ..Default::default() })].into(), ..Default::default() }).await.unwrap();
    let start = Instant::now();
    for _ in 0..3000 { let p = c.admit("f", "m").await.unwrap(); p.success(); }
    println!("coordinator: {:?} per op", start.elapsed() / 3000);
    let start = Instant::now();
    for _ in 0..3000 { let p = c.admit("f", "m").await.unwrap(); drop(p); }
    println!("coordinator drop: {:?} per op", start.elapsed() / 3000);
}
