//! Line charts of the benchmark's sweeps as a standalone SVG (no scripts, fonts or styles from
//! outside): panels stacked over one shared x axis on a log₂ scale (the sweeps double their
//! sizes), several lines per panel, each told apart by its dash pattern and a legend as well as
//! by its colour. The output depends only on the input, so a plot can be committed and diffed.
//!
//! `service::svg` draws one line per panel over steps (inspect, the daemon's report page); this
//! one needs several lines over a size, and shares that module's text helpers.

use std::fmt::Write;

use service::svg::{Frame, LEFT, TOP, WIDTH, esc, num, open_doc};

/// One line: its legend label and `(x, y)` points (any order; drawn in increasing x).
#[derive(Debug, Clone)]
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// One panel: a title, its lines, whether the y axis is logarithmic, and an optional
/// horizontal reference line `(y, label)`.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub lines: Vec<Line>,
    pub log_y: bool,
    pub reference: Option<(f64, String)>,
}

/// Taller panels than `service::svg`'s, with room for the x axis's name below and the legend
/// on the right.
const PANEL: f64 = 190.0;
const RIGHT: f64 = 130.0;
const GAP: f64 = 52.0;
/// Colour and dash pattern of the i-th line (cycled).
const STYLES: [(&str, &str); 5] =
    [("#1f5fa8", "none"), ("#c44e00", "6,3"), ("#2a7f3a", "2,3"), ("#7b3fa0", "8,3,2,3"), ("#555555", "1,2")];

/// The finite points of `line` that `log_y` can draw, in increasing x.
fn drawable(line: &Line, log_y: bool) -> Vec<(f64, f64)> {
    let mut pts: Vec<(f64, f64)> = line
        .points
        .iter()
        .copied()
        .filter(|&(x, y)| x.is_finite() && x > 0.0 && y.is_finite() && (!log_y || y > 0.0))
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    pts
}

/// The SVG document: `title` on top, then one panel per entry of `panels`, each with its x
/// axis labelled `x_label` at every x value any line has.
pub fn chart(title: &str, x_label: &str, panels: &[Panel]) -> String {
    let height = TOP + panels.len() as f64 * (PANEL + GAP) + 10.0;
    let plot_w = WIDTH - LEFT - RIGHT;
    let mut xs: Vec<f64> =
        panels.iter().flat_map(|p| p.lines.iter().flat_map(|l| drawable(l, false))).map(|(x, _)| x).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let (x_lo, x_hi) = match (xs.first(), xs.last()) {
        (Some(&a), Some(&b)) if b > a => (a.log2(), b.log2()),
        (Some(&a), _) => (a.log2() - 1.0, a.log2() + 1.0),
        _ => (0.0, 1.0),
    };
    // A margin so that no point sits on the frame.
    let (x_lo, x_hi) = (x_lo - 0.04 * (x_hi - x_lo), x_hi + 0.04 * (x_hi - x_lo));
    let x = |v: f64| LEFT + plot_w * (v.log2() - x_lo) / (x_hi - x_lo);
    let mut out = String::new();
    open_doc(&mut out, title, WIDTH, height, LEFT);
    for (i, panel) in panels.iter().enumerate() {
        let frame = Frame::stacked(i, plot_w, PANEL, GAP, 30.0);
        let (top, bottom) = (frame.top, frame.bottom);
        frame.open(&mut out, &panel.title);
        for &v in &xs {
            let _ = writeln!(
                out,
                "<line x1=\"{vx:.1}\" y1=\"{bottom}\" x2=\"{vx:.1}\" y2=\"{}\" stroke=\"#888\"/>\n\
                 <text x=\"{vx:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                bottom + 4.0,
                bottom + 16.0,
                num(v),
                vx = x(v)
            );
        }
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555\">{}</text>",
            LEFT + plot_w / 2.0,
            bottom + 29.0,
            esc(x_label)
        );
        let lines: Vec<Vec<(f64, f64)>> = panel.lines.iter().map(|l| drawable(l, panel.log_y)).collect();
        let mut ys: Vec<f64> = lines.iter().flatten().map(|p| p.1).collect();
        if ys.is_empty() {
            frame.no_data(&mut out);
            continue;
        }
        let reference = panel.reference.as_ref().filter(|(v, _)| v.is_finite() && (!panel.log_y || *v > 0.0));
        ys.extend(reference.map(|r| r.0));
        let scale = |v: f64| if panel.log_y { v.log10() } else { v };
        let lo = ys.iter().copied().map(scale).fold(f64::INFINITY, f64::min);
        let hi = ys.iter().copied().map(scale).fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = if hi > lo { (lo, hi) } else { (lo - 0.5, hi + 0.5) };
        let pad = 0.06 * (hi - lo);
        let (lo, hi) = (lo - pad, hi + pad);
        let y = |v: f64| bottom - (bottom - top) * (scale(v) - lo) / (hi - lo);
        let unscale = |s: f64| if panel.log_y { 10f64.powf(s) } else { s };
        for k in 0..=3 {
            let s = lo + (hi - lo) * f64::from(k) / 3.0;
            let vy = bottom - (bottom - top) * f64::from(k) / 3.0;
            let _ = writeln!(
                out,
                "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                LEFT - 6.0,
                vy + 4.0,
                num(unscale(s))
            );
        }
        if panel.log_y {
            let _ = writeln!(
                out,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" fill=\"#555\">log</text>",
                LEFT - 6.0,
                top - 6.0
            );
        }
        if let Some((v, label)) = reference {
            let ry = y(*v);
            let _ = writeln!(
                out,
                "<line class=\"reference\" x1=\"{LEFT}\" y1=\"{ry:.1}\" x2=\"{:.1}\" y2=\"{ry:.1}\" stroke=\"#b00020\" \
                 stroke-dasharray=\"4,4\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#b00020\">{} ({})</text>",
                LEFT + plot_w,
                LEFT + 4.0,
                ry - 4.0,
                esc(label),
                num(*v)
            );
        }
        for (k, (line, pts)) in panel.lines.iter().zip(&lines).enumerate() {
            let (colour, dash) = STYLES[k % STYLES.len()];
            let legend_y = top + 14.0 + 18.0 * k as f64;
            let lx = LEFT + plot_w + 10.0;
            let _ = writeln!(
                out,
                "<line x1=\"{lx}\" y1=\"{legend_y}\" x2=\"{}\" y2=\"{legend_y}\" stroke=\"{colour}\" stroke-width=\"2\" \
                 stroke-dasharray=\"{dash}\"/>\n<text x=\"{}\" y=\"{}\">{}</text>",
                lx + 26.0,
                lx + 32.0,
                legend_y + 4.0,
                esc(&line.label)
            );
            if pts.is_empty() {
                continue;
            }
            let coords: Vec<String> = pts.iter().map(|&(px, py)| format!("{:.1},{:.1}", x(px), y(py))).collect();
            let _ = writeln!(
                out,
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\" points=\"{}\"/>",
                coords.join(" ")
            );
            for c in &coords {
                let (cx, cy) = c.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(out, "<circle cx=\"{cx}\" cy=\"{cy}\" r=\"2.5\" fill=\"{colour}\"/>");
            }
        }
        out.push_str("</g>\n");
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that every element opened is closed in order (attributes are not parsed; text
    /// holds no `<`, which `esc` guarantees) and returns the number of elements.
    fn well_formed(svg: &str) -> usize {
        let mut open: Vec<&str> = Vec::new();
        let mut n = 0;
        for tag in svg.split('<').skip(1).map(|t| t.split('>').next().unwrap()) {
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(open.pop(), Some(name), "</{name}> closes another element");
            } else if !tag.ends_with('/') {
                open.push(tag.split_whitespace().next().unwrap());
                n += 1;
            } else {
                n += 1;
            }
        }
        assert!(open.is_empty(), "unclosed: {open:?}");
        n
    }

    fn line(label: &str, points: &[(f64, f64)]) -> Line {
        Line { label: label.into(), points: points.to_vec() }
    }

    #[test]
    fn panels_are_well_formed_with_a_line_per_series_and_labelled_axes() {
        let panels = [
            Panel {
                title: "ratio <a&b>".into(),
                // Out of order and with a NaN: drawn sorted, without it.
                lines: vec![
                    line("batch 4", &[(256.0, 2.5), (64.0, 4.0), (128.0, f64::NAN), (512.0, 2.1)]),
                    line("batch 8", &[(64.0, 3.0), (512.0, 2.0)]),
                ],
                log_y: false,
                reference: Some((2.0, "floor".into())),
            },
            Panel {
                title: "bytes".into(),
                lines: vec![line("batch 4", &[(64.0, 10.0), (512.0, 0.0), (256.0, 1e6)])],
                log_y: true,
                reference: None,
            },
            Panel { title: "empty".into(), lines: vec![line("batch 4", &[])], log_y: false, reference: None },
        ];
        let s = chart("sweep", "d_model", &panels);
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert!(well_formed(&s) > 20);
        assert!(s.contains("ratio &lt;a&amp;b&gt;") && !s.contains("<a&b>"));
        assert_eq!(s.matches("<polyline").count(), 3, "one per series with points");
        assert_eq!(s.matches(">batch 4<").count(), 2, "a legend entry in every panel with data");
        assert_eq!(s.matches(">d_model<").count(), 3);
        for tick in ["64", "256", "512"] {
            assert_eq!(s.matches(&format!(">{tick}<")).count(), 3, "x tick {tick} in every panel");
        }
        assert!(!s.contains(">128<"), "no tick where no line has a point");
        assert!(s.contains(">floor (2)<") && s.contains("no data"));
        for poly in s.split("points=\"").skip(1).map(|p| p.split('"').next().unwrap()) {
            let xs: Vec<f64> = poly.split(' ').map(|c| c.split(',').next().unwrap().parse().unwrap()).collect();
            assert!(xs.windows(2).all(|w| w[0] < w[1]), "x not increasing: {poly}");
        }
        let first = s.split("points=\"").nth(1).unwrap().split('"').next().unwrap();
        assert_eq!(first.split(' ').count(), 3, "the NaN point is left out");
        assert!(!s.contains("NaN") && !s.contains("inf"), "{s}");
        assert_eq!(s, chart("sweep", "d_model", &panels), "deterministic");
    }
}
