//! The `bench` measurements on synthetic data: the document has every key the issue asks for,
//! with sane values, and the replays stayed bit-identical (the run errors otherwise).

use tiebreak::bench::{Options, run};

#[test]
fn bench_document_has_the_issue_keys() {
    let opts = Options { data: None, steps: 2, rss_steps: 1, models: vec!["mnist-mlp".into()], skip_rss: true };
    let doc = run(&opts).unwrap();
    assert_eq!(doc["data"]["kind"], "synthetic");
    let m = &doc["models"][0];
    assert_eq!(m["model"], "mnist-mlp");
    for key in [
        "trainer_overhead_vs_fp32",
        "replay_vs_trainer",
        "log_bytes_per_step",
        "paper_log_bytes_per_step",
        "log_ratio_vs_paper",
        "record_bytes_per_step",
        "pol_bytes_per_step",
    ] {
        let v = m[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {m}"));
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    assert!(m["logged_fraction"]["all"].as_f64().unwrap() < 0.01);
    assert!(m["bound_tightness"]["max"].as_f64().unwrap() <= 1.0);
    // The same weights and batch: the FP32 baseline's first loss is the verified one's, nearly.
    let (a, b) = (m["loss_first_last"][0].as_f64().unwrap(), m["fp32_loss_first_last"][0].as_f64().unwrap());
    assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    assert_eq!(doc["bisection"]["leaves"], 100_000);
    assert!(doc["bisection"]["queries"].as_u64().unwrap() <= 18);
}
