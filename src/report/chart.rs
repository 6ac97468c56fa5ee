//! Line charts as inline SVG: one per metric, one coloured line per run, axes with round ticks.
//! Long series are thinned to at most [`MAX_POINTS`] points (the last one always kept); short
//! ones (evaluations) get a dot per point, so that a single evaluation still shows.

use std::fmt::Write;

/// Distinct colours for runs, in order (Tableau 10).
pub const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

pub const MAX_POINTS: usize = 1500;
const DOTS_UP_TO: usize = 40;
const W: f64 = 440.0;
const H: f64 = 260.0;
const LEFT: f64 = 62.0;
const RIGHT: f64 = 14.0;
const TOP: f64 = 26.0;
const BOTTOM: f64 = 38.0;

/// One run's points of a metric.
pub struct Line<'a> {
    pub label: &'a str,
    pub color: &'a str,
    pub points: &'a [(f64, f64)],
}

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A round step giving about `n` ticks over `span`: 1, 2 or 5 × 10^k.
fn tick_step(span: f64, n: f64) -> f64 {
    let raw = span / n;
    let mag = 10f64.powf(raw.log10().floor());
    let unit = raw / mag;
    mag * if unit < 1.5 {
        1.0
    } else if unit < 3.5 {
        2.0
    } else if unit < 7.5 {
        5.0
    } else {
        10.0
    }
}

/// Short tick labels: plain for moderate magnitudes, scientific with three digits otherwise.
pub fn number(x: f64) -> String {
    crate::card::short_number(x, 2)
}

/// Ticks covering [lo, hi], and the (possibly widened) range they span.
fn ticks(lo: f64, hi: f64) -> (Vec<f64>, f64, f64) {
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.05 };
        (lo - pad, hi + pad)
    };
    let step = tick_step(hi - lo, 5.0);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    let ticks = (first..=last).map(|i| i as f64 * step).collect();
    (ticks, lo, hi)
}

/// At most [`MAX_POINTS`] of `points`, evenly strided, the last one kept.
fn thin(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    if points.len() <= MAX_POINTS {
        return points.to_vec();
    }
    let stride = points.len().div_ceil(MAX_POINTS);
    let mut out: Vec<(f64, f64)> = points.iter().step_by(stride).copied().collect();
    if out.last() != points.last() {
        out.extend(points.last());
    }
    out
}

/// The chart of one metric: `<svg class="chart">` with a `<g class="series">` per line.
pub fn svg(title: &str, lines: &[Line]) -> String {
    let finite = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite();
    let all: Vec<(f64, f64)> = lines
        .iter()
        .flat_map(|l| l.points.iter().copied().filter(finite))
        .collect();
    let fold = |f: fn(&(f64, f64)) -> f64| {
        all.iter()
            .map(f)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            })
    };
    let (x_lo, x_hi) = fold(|p| p.0);
    let (y_lo, y_hi) = fold(|p| p.1);
    let mut s = String::new();
    write!(
        s,
        r#"<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{t}"><title>{t}</title><text class="title" x="{x}" y="16">{t}</text>"#,
        t = escape(title),
        x = W / 2.0
    )
    .unwrap();
    if all.is_empty() {
        s.push_str(r#"<text x="50%" y="50%" class="empty">no finite values</text></svg>"#);
        return s;
    }
    let (xt, x_lo, x_hi) = ticks(x_lo, x_hi);
    let (yt, y_lo, y_hi) = ticks(y_lo, y_hi);
    let px = |x: f64| LEFT + (x - x_lo) / (x_hi - x_lo) * (W - LEFT - RIGHT);
    let py = |y: f64| H - BOTTOM - (y - y_lo) / (y_hi - y_lo) * (H - TOP - BOTTOM);
    write!(
        s,
        r#"<rect class="frame" x="{LEFT}" y="{TOP}" width="{}" height="{}"/>"#,
        W - LEFT - RIGHT,
        H - TOP - BOTTOM
    )
    .unwrap();
    for &y in &yt {
        write!(
            s,
            r#"<line class="grid" x1="{LEFT}" x2="{:.1}" y1="{y0:.1}" y2="{y0:.1}"/><text class="tick" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            W - RIGHT,
            LEFT - 4.0,
            py(y) + 3.5,
            number(y),
            y0 = py(y)
        )
        .unwrap();
    }
    for &x in &xt {
        write!(
            s,
            r#"<text class="tick" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            px(x),
            H - BOTTOM + 14.0,
            number(x)
        )
        .unwrap();
    }
    write!(
        s,
        r#"<text class="axis" x="{:.1}" y="{:.1}" text-anchor="middle">step</text>"#,
        LEFT + (W - LEFT - RIGHT) / 2.0,
        H - 6.0
    )
    .unwrap();
    for line in lines {
        let points = thin(line.points);
        write!(
            s,
            r#"<g class="series" stroke="{c}" fill="{c}"><title>{}</title><path fill="none" stroke-width="1.6" d=""#,
            escape(line.label),
            c = line.color
        )
        .unwrap();
        // A non-finite value breaks the line.
        let mut pen_down = false;
        for &(x, y) in &points {
            if !finite(&(x, y)) {
                pen_down = false;
                continue;
            }
            let cmd = if pen_down { 'L' } else { 'M' };
            write!(s, "{cmd}{:.1} {:.1} ", px(x), py(y)).unwrap();
            pen_down = true;
        }
        s.push_str(r#""/>"#);
        if points.len() <= DOTS_UP_TO {
            for &(x, y) in points.iter().filter(|p| finite(p)) {
                write!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="2.6"><title>{}: step {}, {}</title></circle>"#,
                    px(x),
                    py(y),
                    escape(line.label),
                    number(x),
                    number(y)
                )
                .unwrap();
            }
        }
        s.push_str("</g>");
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        // 0.74 over about 5 ticks: steps of 0.1 (1 × 10^-1), from 0.2 to 0.8.
        let (t, lo, hi) = ticks(0.13, 0.87);
        assert_eq!((lo, hi), (0.13, 0.87));
        assert_eq!(t.len(), 7, "{t:?}");
        for (i, x) in t.iter().enumerate() {
            assert!((x - (0.2 + 0.1 * i as f64)).abs() < 1e-12, "{t:?}");
        }
        assert_eq!(number(t[1]), "0.3", "tick labels hide the float noise");
        let (t, _, _) = ticks(0.0, 1000.0);
        assert_eq!(t, [0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]);
        let (t, lo, hi) = ticks(5.0, 5.0);
        assert!(lo < 5.0 && hi > 5.0 && !t.is_empty());
        assert_eq!(number(0.000012), "1.20e-5");
        assert_eq!(number(0.5), "0.5");
        assert_eq!(number(150.0), "150");
    }

    #[test]
    fn charts_draw_each_line_and_break_at_gaps() {
        let a = [(1.0, 0.5), (2.0, f64::NAN), (3.0, 0.7), (4.0, 0.9)];
        let b = [(4.0, 0.1)];
        let s = svg(
            "loss <eval>",
            &[
                Line {
                    label: "a",
                    color: COLORS[0],
                    points: &a,
                },
                Line {
                    label: "b&c",
                    color: COLORS[1],
                    points: &b,
                },
            ],
        );
        assert!(s.contains("loss &lt;eval&gt;") && s.contains("<title>b&amp;c</title>"));
        assert_eq!(s.matches(r#"<g class="series""#).count(), 2);
        let path = s.split(r#"d=""#).nth(1).unwrap().split('"').next().unwrap();
        assert_eq!(
            path.matches('M').count(),
            2,
            "the NaN splits the line: {path}"
        );
        assert_eq!(path.matches('L').count(), 1, "{path}");
        assert_eq!(s.matches("<circle").count(), 4, "one dot per finite point");
        let long: Vec<(f64, f64)> = (0..10_000).map(|i| (i as f64, i as f64)).collect();
        let thinned = thin(&long);
        assert!(thinned.len() <= MAX_POINTS + 1);
        assert_eq!(thinned.last(), long.last());
    }
}
