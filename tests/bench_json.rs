//! The `bench` measurements on synthetic data: the document has every key the issue asks for,
//! with sane values, and the replays stayed bit-identical (the run errors otherwise).

use serde_json::Value;
use tiebreak::bench::{Options, run};

/// The bench of one model on synthetic data, `steps` steps, without the peak-memory children.
fn run_on_synthetic_data(model: &str, steps: u64) -> Value {
    let opts = Options {
        data: None,
        steps,
        rss_steps: 1,
        models: vec![model.into()],
        skip_rss: true,
        interval_reps: 1,
        scaling: None,
    };
    run(&opts).unwrap()
}

#[test]
fn bench_document_has_the_issue_keys() {
    let doc = run_on_synthetic_data("mnist-mlp", 3);
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
    // Every timing ratio is the median of per-step pairs, with its spread.
    for key in ["trainer_overhead_vs_fp32", "replay_vs_trainer"] {
        let s = &m[format!("{key}_spread")];
        let (lo, med, hi) = (s["min"].as_f64().unwrap(), s["median"].as_f64().unwrap(), s["max"].as_f64().unwrap());
        assert!(lo <= med && med <= hi && lo > 0.0, "{key}: {s}");
        assert_eq!(s["pairs"], 2, "{key}: one pair per step after the warm-up step");
        assert_eq!(m[key].as_f64().unwrap(), med, "{key}");
    }
    assert_eq!(doc["timed_steps_per_model"], 2);
    assert_eq!(m["graph_vs_handwritten"]["graph_overhead_spread"]["pairs"], 2, "the graph pairs skip the warm-up too");
    assert_eq!(m["replay_profile"], "cpu-alt");
    for p in ["cpu", "cpu-alt", "cpu-seq", "cpu-splitk"] {
        assert!(m["replay_by_profile"][p]["replay_vs_trainer"].as_f64().unwrap() > 0.0, "{p}");
    }
    let iv = &m["interval_replay"];
    assert!(iv["speedup_vs_one_thread"].as_f64().unwrap() > 0.0, "{iv}");
    assert_eq!((&iv["speedup_spread"]["pairs"], &iv["intervals"]), (&1.into(), &2.into()), "{iv}");
    assert!(doc["machine"]["simd_level"].is_string() && doc["machine"]["cpu_flags"].is_array(), "{}", doc["machine"]);
    assert_eq!((doc["record_format"].as_u64(), doc["state_hash"].as_str()), (Some(5), Some("blake3")));
    assert!(m["logged_fraction"]["all"].as_f64().unwrap() < 0.01);
    assert!(m["bound_tightness"]["max"].as_f64().unwrap() <= 1.0);
    // The same weights and batch: the FP32 baseline's first loss is the verified one's, nearly.
    let (a, b) = (m["loss_first_last"][0].as_f64().unwrap(), m["fp32_loss_first_last"][0].as_f64().unwrap());
    assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    assert_eq!(doc["bisection"]["leaves"], 100_000);
    assert!(doc["bisection"]["queries"].as_u64().unwrap() <= 18);
    assert!(doc.get("scaling").is_none(), "the sweep is opt-in");
}

/// A model that exists only as a graph (the residual CNN, with batch norm and skip connections)
/// is measured like the presets against candle's FP32 interpretation of the same graph, without
/// the hand-written comparison it has no twin for.
#[test]
fn bench_measures_the_graph_models() {
    let conv = ["conv2d_backward", "batch_norm_backward", "avg_pool2d", "adamw"];
    let text = ["embedding_backward", "layer_norm_backward", "softmax_backward", "gelu", "adamw"];
    for (model, ops) in [("mnist-resnet", &conv[..]), ("shakespeare-graph", &text[..])] {
        let doc = run_on_synthetic_data(model, 2);
        let m = &doc["models"][0];
        assert_eq!(m["model"], model);
        for key in ["trainer_overhead_vs_fp32", "replay_vs_trainer", "log_ratio_vs_paper"] {
            let v = m[key].as_f64().unwrap_or_else(|| panic!("{model}: {key} missing: {m}"));
            assert!(v.is_finite() && v > 0.0, "{model}: {key} = {v}");
        }
        assert!(m["graph_vs_handwritten"].is_null(), "{model}: {}", m["graph_vs_handwritten"]);
        for &op in ops {
            assert!(m["bound_tightness"]["per_op"][op].is_number(), "{model}: {op}: {}", m["bound_tightness"]);
        }
        // Candle's FP32 graph starts from the same weights and batch as the verified one.
        let (a, b) = (m["loss_first_last"][0].as_f64().unwrap(), m["fp32_loss_first_last"][0].as_f64().unwrap());
        assert!((a - b).abs() < 1e-4, "{model}: {a} vs {b}");
    }
}
