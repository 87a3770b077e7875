//! Per-step series as a standalone SVG (no scripts, no external fonts or styles), one panel
//! each, sharing the step axis: `trainer-agent inspect --plot` (loss, tie-breaks and log bytes
//! per step) and the daemon's report page (replay time per step, the diverging step marked).

use std::fmt::Write;

/// One panel: a title and `(step, value)` points in step order.
#[derive(Debug, Clone)]
pub struct Series {
    pub title: String,
    pub points: Vec<(u64, f64)>,
}

/// The document's width, the left margin (the y axis labels) and the height of the heading
/// above the first panel; shared with the bench's charts so all plots look alike.
pub const WIDTH: f64 = 760.0;
pub const LEFT: f64 = 78.0;
pub const TOP: f64 = 46.0;
const PANEL: f64 = 170.0;
const RIGHT: f64 = 20.0;
const GAP: f64 = 42.0;

/// Escapes text for SVG.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A compact number for an axis label.
pub fn num(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-2) {
        format!("{v:.2e}")
    } else {
        format!("{}", (v * 1000.0).round() / 1000.0)
    }
}

/// Opens a standalone SVG document `width` × `height` with `title` as its accessible name and
/// its heading (at x = `left`); the caller closes it with `</svg>`.
pub fn open_doc(out: &mut String, title: &str, width: f64, height: f64, left: f64) {
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" \
         font-family=\"sans-serif\" font-size=\"12\" role=\"img\" aria-label=\"{t}\">\n<title>{t}</title>\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"24\" font-size=\"15\" font-weight=\"bold\">{t}</text>\n",
        t = esc(title)
    );
}

/// A panel's plotting area.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub left: f64,
    pub width: f64,
    pub top: f64,
    pub bottom: f64,
}

impl Frame {
    /// The frame of the `i`-th of panels stacked `panel + gap` apart below the heading, `plot_w`
    /// wide, its title above it and `below` left under it for the x axis's labels.
    pub fn stacked(i: usize, plot_w: f64, panel: f64, gap: f64, below: f64) -> Frame {
        let top = TOP + i as f64 * (panel + gap) + 18.0;
        Frame { left: LEFT, width: plot_w, top, bottom: top + panel - below }
    }

    /// Opens the panel's group (`<g class="panel" data-series=…>`): its title above the frame,
    /// and the frame. The caller closes it with `</g>`.
    pub fn open(&self, out: &mut String, title: &str) {
        let Frame { left, width, top, bottom } = *self;
        let _ = writeln!(out, "<g class=\"panel\" data-series=\"{}\">", esc(title));
        let _ = writeln!(out, "<text x=\"{left}\" y=\"{}\" font-weight=\"bold\">{}</text>", top - 6.0, esc(title));
        let _ = writeln!(
            out,
            "<rect x=\"{left}\" y=\"{top}\" width=\"{width}\" height=\"{}\" fill=\"none\" stroke=\"#888\"/>",
            bottom - top
        );
    }

    /// Says "no data" in the middle of the frame and closes the panel's group.
    pub fn no_data(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555\">no data</text>\n</g>",
            self.left + self.width / 2.0,
            (self.top + self.bottom) / 2.0
        );
    }
}

/// The SVG document: `title` on top, then one panel per series (an empty series says so in
/// its panel instead of drawing a line). Every panel's x axis runs from `first` to `last` step.
/// Each of `marks` is a dashed vertical line at its step across every panel, labelled with its
/// text (so nothing is told by colour alone).
pub fn svg(title: &str, first: u64, last: u64, series: &[Series], marks: &[(u64, String)]) -> String {
    let height = TOP + series.len() as f64 * (PANEL + GAP) + 10.0;
    let plot_w = WIDTH - LEFT - RIGHT;
    let span = (last.saturating_sub(first)).max(1) as f64;
    let x = |step: u64| LEFT + plot_w * (step.saturating_sub(first)) as f64 / span;
    let mut out = String::new();
    open_doc(&mut out, title, WIDTH, height, LEFT);
    for (i, s) in series.iter().enumerate() {
        let frame = Frame::stacked(i, plot_w, PANEL, GAP, 18.0);
        let (top, bottom) = (frame.top, frame.bottom);
        frame.open(&mut out, &s.title);
        if s.points.is_empty() {
            frame.no_data(&mut out);
            continue;
        }
        let lo = s.points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = s.points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = if hi > lo { (lo, hi) } else { (lo - 0.5, hi + 0.5) };
        let y = |v: f64| bottom - (bottom - top) * (v - lo) / (hi - lo);
        for (v, anchor_y) in [(hi, top + 4.0), (lo, bottom)] {
            let _ = writeln!(out, "<text x=\"{}\" y=\"{anchor_y}\" text-anchor=\"end\">{}</text>", LEFT - 6.0, num(v));
        }
        for (step, label) in marks {
            let mx = x((*step).clamp(first, last));
            let _ = writeln!(
                out,
                "<line class=\"mark\" x1=\"{mx:.1}\" y1=\"{top}\" x2=\"{mx:.1}\" y2=\"{bottom}\" stroke=\"#b00020\" \
                 stroke-dasharray=\"5,3\"/>\n<text x=\"{:.1}\" y=\"{}\" fill=\"#b00020\">{}</text>",
                mx + 4.0,
                top + 14.0,
                esc(label)
            );
        }
        let pts: Vec<String> = s.points.iter().map(|&(st, v)| format!("{:.1},{:.1}", x(st), y(v))).collect();
        let _ = writeln!(
            out,
            "<polyline fill=\"none\" stroke=\"#1f5fa8\" stroke-width=\"1.5\" points=\"{}\"/>",
            pts.join(" ")
        );
        for (step, anchor) in [(first, "start"), (last, "end")] {
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"{anchor}\">step {step}</text>",
                x(step),
                bottom + 15.0
            );
        }
        out.push_str("</g>\n");
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panels_hold_one_point_per_step_and_escape_text() {
        let s = svg(
            "run <a&b>",
            1,
            3,
            &[
                Series { title: "loss".into(), points: vec![(1, 2.0), (2, 1.0), (3, 0.5)] },
                Series { title: "flat".into(), points: vec![(1, 4.0), (2, 4.0), (3, 4.0)] },
                Series { title: "none".into(), points: vec![] },
            ],
            &[(2, "diverged at step 2".into())],
        );
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert!(s.contains("run &lt;a&amp;b&gt;") && !s.contains("<a&b>"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("no data"));
        assert_eq!(s.matches("diverged at step 2").count(), 2, "the mark is labelled in each drawn panel");
        let first = s.split("points=\"").nth(1).unwrap().split('"').next().unwrap();
        assert_eq!(first.split(' ').count(), 3);
        assert!(!s.contains("NaN") && !s.contains("inf"), "{s}");
    }
}
