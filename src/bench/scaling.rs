//! Scaling curves of the GPT preset (issue 20, item 5): the same paired measurement as every
//! preset's report ([`super::steps`]) at each point of a grid of widths (`d_model`) and batch
//! sizes, so the figures say how the trainer's overhead over plain FP32, the replay's cost and
//! the log grow with the model, not at one size only.
//!
//! The question the curves answer: does the trainer's step approach the FP64/FP32 floor (about
//! 2×: the same products in FP64 instead of FP32) as the products grow and the fixed per-step
//! costs (rounding every site, hashing, bounds of small ops) weigh less; and does the log grow
//! with the values rounded or slower?
//!
//! Every point keeps the preset's depth, context, data, seed and optimizer; only the width, the
//! number of heads and the batch size change. The heads keep the preset's head width
//! (`d_model / heads` = 32), as GPT-2's sizes do, so the attention's products grow with the
//! model like the rest. Replay is on the auditor's default profile only (the per-preset report
//! covers the others), beside a rerun of the trainer's step.

use std::fmt::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use engine::spec::ModelConfig;
use engine::train::{Run, StepMode};
use kernels::Profile;
use serde_json::{Value, json};

use super::stats::{load_average, mean, median};
use super::svg::{Line, Panel, chart};
use super::{Setup, TRAINER_PROFILE, auditor_profile, steps};

/// The preset the sweep scales.
pub const MODEL: &str = "shakespeare-gpt";

/// Default widths (`d_model`), smallest first.
pub const WIDTHS: [usize; 4] = [64, 128, 256, 512];

/// Default batch sizes, smallest first.
pub const BATCH_SIZES: [usize; 3] = [4, 8, 16];

/// Default steps per point: a warm-up (step 1, run but not timed; see `steps::StepTimings`) and
/// an even number of timed ones, so that each order of a pair (trainer first, FP32 first) is
/// timed equally often; few, because the widest points take seconds per step on two cores.
pub const STEPS: u64 = 5;

/// The FP64/FP32 floor the trainer's ratio is read against (the same products in twice the
/// width), drawn as a reference line.
pub const FP64_FLOOR: f64 = 2.0;

/// What to sweep.
#[derive(Debug, Clone)]
pub struct Options {
    pub data: Option<PathBuf>,
    pub widths: Vec<usize>,
    pub batch_sizes: Vec<usize>,
    /// Timed steps per point.
    pub steps: u64,
}

impl Default for Options {
    fn default() -> Options {
        Options { data: None, widths: WIDTHS.to_vec(), batch_sizes: BATCH_SIZES.to_vec(), steps: STEPS }
    }
}

/// One point of the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    pub d_model: usize,
    pub heads: usize,
    pub batch_size: usize,
}

/// The grid, width-major: every width with every batch size. `heads` keeps the base's head
/// width where it divides `d_model`, else the largest smaller count that divides it.
pub fn points(base_d_model: usize, base_heads: usize, widths: &[usize], batch_sizes: &[usize]) -> Vec<Point> {
    let head_width = (base_d_model / base_heads.max(1)).max(1);
    let mut out = Vec::new();
    for &d_model in widths {
        let mut heads = (d_model / head_width).max(1);
        while heads > 1 && d_model % heads != 0 {
            heads -= 1;
        }
        for &batch_size in batch_sizes {
            out.push(Point { d_model, heads, batch_size });
        }
    }
    out
}

/// `base` (the GPT preset) at `p`: the same data, seed and schedule, another width and batch.
pub fn setup_at(base: &Setup, p: Point) -> Result<Setup> {
    let mut s = base.clone();
    let ModelConfig::Gpt(g) = &mut s.config.model else { bail!("the scaling sweep needs a GPT preset") };
    g.d_model = p.d_model;
    g.heads = p.heads;
    s.config.train.batch_size = p.batch_size;
    Ok(s)
}

/// Runs the sweep and returns the `"scaling"` part of the bench's JSON.
pub fn run(opts: &Options) -> Result<Value> {
    ensure!(!opts.widths.is_empty() && !opts.batch_sizes.is_empty(), "the scaling sweep needs widths and batch sizes");
    let t0 = Instant::now();
    let load_start = load_average();
    let base = Setup::new(MODEL, opts.data.as_deref())?;
    let ModelConfig::Gpt(g) = &base.config.model else { bail!("{MODEL} is not a GPT preset") };
    let grid = points(g.d_model, g.heads, &opts.widths, &opts.batch_sizes);
    let auditor = auditor_profile();
    let mut out = Vec::new();
    for (i, &p) in grid.iter().enumerate() {
        let name = format!("{MODEL} d_model {} × batch {}", p.d_model, p.batch_size);
        eprintln!("bench: scaling {}/{}: {name}: {} steps", i + 1, grid.len(), opts.steps);
        out.push(measure_point(&base, p, auditor, opts.steps, &name)?);
    }
    Ok(json!({
        "model": MODEL,
        "data": {"kind": base.data_kind, "source": base.data_source},
        "steps_per_point": opts.steps,
        "widths": opts.widths,
        "batch_sizes": opts.batch_sizes,
        "trainer_profile": TRAINER_PROFILE.name(),
        "replay_profile": auditor.name(),
        "fp64_floor": FP64_FLOOR,
        "points": out,
        "load_average_start_end": [load_start, load_average()],
        "total_seconds": t0.elapsed().as_secs_f64(),
        "method": "per point, the per-preset paired step loop (bench::steps; step 1 a warm-up, run but not timed): trainer step beside the candle FP32 step, replay on the auditor's default profile beside a rerun of the trainer's step, alternating order; ratios are medians of the per-step pairs with min/max; heads keep the preset's head width (32)",
    }))
}

fn measure_point(base: &Setup, p: Point, auditor: Profile, steps: u64, name: &str) -> Result<Value> {
    let setup = setup_at(base, p)?;
    let trainer = setup.run(TRAINER_PROFILE, steps)?;
    let replayers = [(auditor, setup.run(auditor, steps)?)];
    let (mut rounded, mut paper_bytes) = (Vec::new(), None);
    let m = steps::paired_steps(name, &trainer, &replayers, steps, |t, state, _, out| {
        rounded.push(out.rounded.values().sum::<u64>() as f64);
        if t == 1 {
            // The paper's dense log of the first step, as the per-preset report measures it
            // (untimed here: its cost is the per-preset report's business).
            let paper = trainer.step(state, t, StepMode::Commit { paper: true }, None)?;
            ensure!(
                trainer.state_digest(&paper.state) == trainer.state_digest(&out.state),
                "{name}: the paper-log run changed the state"
            );
            let dense = paper.paper.context("commit with paper: true gave no dense log")?;
            paper_bytes = Some((dense.compressed_bytes() as f64, out.log.compress().len() as f64));
        }
        Ok(())
    })?;
    let log_bytes: Vec<f64> = m.logs.iter().map(|l| l.len() as f64).collect();
    let (paper_first, log_first) = paper_bytes.unwrap_or((f64::NAN, f64::NAN));
    let params = parameters(&trainer);
    Ok(json!({
        "d_model": p.d_model,
        "heads": p.heads,
        "batch_size": p.batch_size,
        "parameters": params,
        "rounded_values_per_step": mean(&rounded),
        "trainer_step_seconds_median": median(&m.train_s),
        "fp32_step_seconds_median": median(&m.fp32_s),
        "trainer_overhead_vs_fp32": m.vs_fp32.median(),
        "trainer_overhead_vs_fp32_spread": m.vs_fp32.spread(),
        "replay_step_seconds_median": median(&m.replay_s[0]),
        "replay_vs_trainer": m.replay_vs[0].median(),
        "replay_vs_trainer_spread": m.replay_vs[0].spread(),
        "tie_breaks_per_step": mean(&m.entries),
        "log_bytes_per_step": mean(&log_bytes),
        "logged_fraction": mean(&m.entries) / mean(&rounded),
        "log_bytes_per_tie_break": mean(&log_bytes) / mean(&m.entries),
        "paper_log_bytes_first_step": paper_first,
        "log_ratio_vs_paper_first_step": paper_first / log_first,
        "loss_first_last": [m.losses.first(), m.losses.last()],
    }))
}

/// The model's parameter count (without the optimizer's state).
fn parameters(run: &Run) -> usize {
    run.model.params().iter().map(|p| p.shape.iter().product::<usize>()).sum()
}

/// The points of a sweep's JSON grouped by batch size: `(batch, [(d_model, point)])`, both in
/// increasing order.
fn by_batch(scaling: &Value) -> Vec<(u64, Vec<(u64, &Value)>)> {
    let mut groups: Vec<(u64, Vec<(u64, &Value)>)> = Vec::new();
    for p in scaling["points"].as_array().into_iter().flatten() {
        let (Some(b), Some(d)) = (p["batch_size"].as_u64(), p["d_model"].as_u64()) else { continue };
        match groups.iter_mut().find(|(gb, _)| *gb == b) {
            Some((_, v)) => v.push((d, p)),
            None => groups.push((b, vec![(d, p)])),
        }
    }
    groups.sort_by_key(|(b, _)| *b);
    for (_, v) in &mut groups {
        v.sort_by_key(|(d, _)| *d);
    }
    groups
}

/// The sweep's curves as an SVG document (x: `d_model`, one line per batch size), from the
/// JSON that [`run`] returns.
pub fn plot(scaling: &Value) -> String {
    let groups = by_batch(scaling);
    let panel = |title: &str, key: &str, log_y: bool, reference: Option<(f64, &str)>| Panel {
        title: title.to_string(),
        log_y,
        reference: reference.map(|(v, l)| (v, l.to_string())),
        lines: groups
            .iter()
            .map(|(b, pts)| Line {
                label: format!("batch {b}"),
                points: pts.iter().filter_map(|(d, p)| Some((*d as f64, p[key].as_f64()?))).collect(),
            })
            .collect(),
    };
    let floor = scaling["fp64_floor"].as_f64().unwrap_or(FP64_FLOOR);
    let panels = [
        panel(
            "trainer step / plain FP32 candle step (median of pairs)",
            "trainer_overhead_vs_fp32",
            false,
            Some((floor, "FP64/FP32 floor")),
        ),
        panel(
            "replay on the auditor's profile / trainer step (median of pairs)",
            "replay_vs_trainer",
            false,
            Some((1.0, "1×")),
        ),
        panel("trainer step seconds (median)", "trainer_step_seconds_median", true, None),
        panel("tie-breaks per step", "tie_breaks_per_step", true, None),
        panel("log bytes per step (stored)", "log_bytes_per_step", true, None),
        panel(
            "the paper's dense log / ours (first step)",
            "log_ratio_vs_paper_first_step",
            true,
            Some((1000.0, "target")),
        ),
    ];
    let title = format!(
        "{} scaling: {} steps per point, trainer {} vs replay {}",
        scaling["model"].as_str().unwrap_or(MODEL),
        scaling["steps_per_point"],
        scaling["trainer_profile"].as_str().unwrap_or("?"),
        scaling["replay_profile"].as_str().unwrap_or("?"),
    );
    chart(&title, "d_model", &panels)
}

/// The sweep as a Markdown table (one row per point), for the README.
pub fn table(scaling: &Value) -> String {
    let mut s = String::from(
        "| d_model | heads | batch | params | trainer s | FP32 s | trainer / FP32 [min–max] | replay / trainer [min–max] | tie-breaks / step | log bytes / step | paper log / ours (step 1) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let spread = |v: &Value| {
        format!(
            "{:.2} [{:.2}–{:.2}]",
            v["median"].as_f64().unwrap_or(f64::NAN),
            v["min"].as_f64().unwrap_or(f64::NAN),
            v["max"].as_f64().unwrap_or(f64::NAN)
        )
    };
    for (_, pts) in by_batch(scaling) {
        for (_, p) in pts {
            let f = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.3} | {:.3} | {} | {} | {:.0} | {:.0} | {:.0} |",
                p["d_model"],
                p["heads"],
                p["batch_size"],
                p["parameters"],
                f("trainer_step_seconds_median"),
                f("fp32_step_seconds_median"),
                spread(&p["trainer_overhead_vs_fp32_spread"]),
                spread(&p["replay_vs_trainer_spread"]),
                f("tie_breaks_per_step"),
                f("log_bytes_per_step"),
                f("log_ratio_vs_paper_first_step"),
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::data::Dataset;

    /// The GPT preset on a short synthetic text (the spec's checks count the text's windows;
    /// they need no megabyte of it).
    fn small_base() -> Setup {
        let config = engine::spec::Config::from_toml(super::super::config_text(MODEL).unwrap(), MODEL).unwrap();
        let ModelConfig::Gpt(g) = &config.model else { panic!("{MODEL} is not a GPT") };
        let engine::spec::DataConfig::Text(t) = &config.data else { panic!("{MODEL} does not read text") };
        let data = Dataset::text(super::super::synthetic_text(3, 20_000), g.context, t.holdout_fraction).unwrap();
        Setup { config, data, data_kind: "synthetic", data_source: "20,000 bytes of synthetic text".into() }
    }

    #[test]
    fn every_point_of_the_default_grid_is_a_valid_spec() {
        let base = small_base();
        let grid = points(128, 4, &WIDTHS, &BATCH_SIZES);
        assert_eq!(grid.len(), WIDTHS.len() * BATCH_SIZES.len());
        let mut last_params = 0;
        for p in grid {
            assert_eq!(p.d_model % p.heads, 0, "{p:?}");
            assert_eq!(p.d_model / p.heads, 32, "{p:?} keeps the preset's head width");
            let s = setup_at(&base, p).unwrap();
            let spec = s.spec(STEPS);
            spec.validate().unwrap_or_else(|e| panic!("{p:?}: {e}"));
            let ModelConfig::Gpt(g) = &spec.config.model else { panic!() };
            assert_eq!((g.d_model, g.heads, spec.config.train.batch_size), (p.d_model, p.heads, p.batch_size));
            let run = s.run(TRAINER_PROFILE, STEPS).unwrap();
            let params = parameters(&run);
            if p.batch_size == BATCH_SIZES[0] {
                assert!(params > last_params, "{p:?}: {params} parameters, not more than the narrower model's");
                last_params = params;
            }
        }
    }

    #[test]
    fn heads_divide_odd_widths() {
        let ds: Vec<(usize, usize)> =
            points(128, 4, &[48, 80, 96, 8], &[1]).iter().map(|p| (p.d_model, p.heads)).collect();
        assert_eq!(ds, vec![(48, 1), (80, 2), (96, 3), (8, 1)]);
    }

    fn fake_sweep() -> Value {
        let pt = |d: u64, b: u64, r: f64| {
            json!({"d_model": d, "heads": d / 32, "batch_size": b, "parameters": d * d,
                "trainer_step_seconds_median": r / 10.0, "fp32_step_seconds_median": 0.1,
                "trainer_overhead_vs_fp32": r, "trainer_overhead_vs_fp32_spread": {"median": r, "min": r, "max": r},
                "replay_vs_trainer": 1.0, "replay_vs_trainer_spread": {"median": 1.0, "min": 0.9, "max": 1.1},
                "tie_breaks_per_step": d as f64, "log_bytes_per_step": 10.0 * d as f64})
        };
        // Out of order on purpose: the plot and the table sort by batch, then width.
        json!({"model": MODEL, "steps_per_point": 2, "trainer_profile": "cpu", "replay_profile": "cpu-alt",
            "fp64_floor": 2.0,
            "points": [pt(256, 8, 2.5), pt(64, 8, 4.0), pt(64, 4, 5.0), pt(256, 4, 3.0), pt(128, 4, 3.5), pt(128, 8, 3.0)]})
    }

    #[test]
    fn the_plot_has_one_line_per_batch_size_in_every_panel() {
        let s = plot(&fake_sweep());
        assert_eq!(s.matches("<polyline").count(), 5 * 2, "five panels with data, two batch sizes");
        assert_eq!(s.matches(">batch 4<").count(), 5);
        assert!(s.contains("no data"), "the fake sweep has no paper log");
        assert!(s.contains("FP64/FP32 floor"));
        assert_eq!(s, plot(&fake_sweep()), "the same sweep gives the same bytes");
    }

    #[test]
    fn the_table_has_a_row_per_point_sorted_by_batch_then_width() {
        let t = table(&fake_sweep());
        let rows: Vec<&str> = t.lines().skip(2).collect();
        assert_eq!(rows.len(), 6);
        assert!(rows[0].starts_with("| 64 | 2 | 4 |") && rows[2].starts_with("| 256 | 8 | 4 |"), "{t}");
        assert!(rows[0].contains("5.00 [5.00–5.00]") && rows[0].contains("1.00 [0.90–1.10]"), "{t}");
    }
}
