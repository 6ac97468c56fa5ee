//! `dpo-sam plot`: one PNG line chart per metric found in `metrics.jsonl` files, one line per
//! run; also the PNG chart helpers (`Series`, `Panel`, `write_chart`) that `toy` draws with.
//!
//! Text is rendered with an embedded DejaVu Sans (`assets/`), so the binary needs no system
//! fonts or fontconfig.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle, RGBColor};

/// Plot training curves from one or more runs.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example: dpo-sam plot runs/gd runs/sam --label GD --label SAM --out plots")]
pub struct PlotArgs {
    /// Run directories (meaning `<dir>/metrics.jsonl`) or `metrics.jsonl` files. Each line is a
    /// JSON object; every numeric field except `step` becomes a chart with `step` on the x axis.
    #[arg(required = true, value_name = "RUN_DIR_OR_METRICS_JSONL")]
    pub inputs: Vec<PathBuf>,
    /// Directory the PNGs are written to (created if missing), one per metric, named after it
    /// with `/` turned into `_` (e.g. `rewards/accuracies` -> `rewards_accuracies.png`).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Legend name of each input, in order; give it once per input or not at all (the default
    /// is the run directory's name).
    #[arg(long = "label", value_name = "NAME")]
    pub labels: Vec<String>,
}

pub fn run(args: PlotArgs) -> Result<()> {
    let written = plot_metrics(&args.inputs, &args.labels, &args.out)?;
    if written.is_empty() {
        println!("no numeric metrics with a `step` found; nothing written");
    }
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

/// Writes one chart per metric and returns the paths written.
fn plot_metrics(inputs: &[PathBuf], labels: &[String], out: &Path) -> Result<Vec<PathBuf>> {
    if !labels.is_empty() && labels.len() != inputs.len() {
        bail!(
            "got {} --label for {} inputs; give one per input or none",
            labels.len(),
            inputs.len()
        );
    }
    // metric -> one series per run
    let mut metrics: BTreeMap<String, Vec<Series>> = BTreeMap::new();
    for (i, input) in inputs.iter().enumerate() {
        let file = if input.is_dir() {
            input.join("metrics.jsonl")
        } else {
            input.clone()
        };
        let label = labels.get(i).cloned().unwrap_or_else(|| run_name(&file));
        for (metric, points) in read_metrics(&file)? {
            metrics.entry(metric).or_default().push(Series {
                name: label.clone(),
                points,
            });
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut used = HashSet::new();
    let mut written = Vec::new();
    for (metric, series) in metrics {
        let mut stem = sanitise(&metric);
        // `a/b` and `a_b` would otherwise overwrite each other.
        while !used.insert(stem.clone()) {
            stem.push('_');
        }
        let path = out.join(format!("{stem}.png"));
        let panel = Panel {
            title: metric.clone(),
            x_label: "step".into(),
            y_label: metric,
            series,
        };
        write_chart(&path, None, &[panel])?;
        written.push(path);
    }
    Ok(written)
}

/// Reads `file` into metric -> (step, value) points; lines without a numeric `step` and
/// non-numeric fields are skipped, a line that is not a JSON object is an error.
pub fn read_metrics(file: &Path) -> Result<BTreeMap<String, Vec<(f64, f64)>>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut metrics: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let where_ = || format!("{}:{}", file.display(), i + 1);
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: malformed JSON line", where_()))?;
        let Some(object) = value.as_object() else {
            bail!("{}: expected a JSON object", where_());
        };
        let Some(step) = object.get("step").and_then(|s| s.as_f64()) else {
            continue;
        };
        for (key, v) in object {
            if let (true, Some(v)) = (key != "step", v.as_f64()) {
                metrics.entry(key.clone()).or_default().push((step, v));
            }
        }
    }
    Ok(metrics)
}

/// Legend name for a metrics file: its directory's name, else the file name.
pub fn run_name(file: &Path) -> String {
    file.parent()
        .and_then(|d| d.file_name())
        .or_else(|| file.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| file.display().to_string())
}

fn sanitise(metric: &str) -> String {
    metric
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// One line of a chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart: its series share the axes; series `i` gets colour `i` in every panel.
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

const PANEL_SIZE: (u32, u32) = (800, 560);
const FONT: &str = "sans-serif";
// Tableau 10: distinguishable, also in greyscale print.
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn register_embedded_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = REGISTERED.get_or_init(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        register_font(FONT, FontStyle::Normal, bytes).is_ok()
    });
    if *ok {
        Ok(())
    } else {
        bail!("the embedded font could not be parsed")
    }
}

/// Draws `panels` side by side into the PNG at `path`, under an optional title (one text line
/// per line of `title`).
pub fn write_chart(path: &Path, title: Option<&str>, panels: &[Panel]) -> Result<()> {
    register_embedded_font()?;
    let n = panels.len().max(1) as u32;
    let title_lines: Vec<&str> = title.map(|t| t.lines().collect()).unwrap_or_default();
    let title_h = if title_lines.is_empty() {
        0
    } else {
        16 + 34 * title_lines.len() as u32
    };
    let size = (PANEL_SIZE.0 * n, PANEL_SIZE.1 + title_h);
    let draw = || -> Result<()> {
        let root = BitMapBackend::new(path, size).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, body) = root.split_vertically(title_h);
        let style = TextStyle::from((FONT, 26).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
        for (i, line) in title_lines.iter().enumerate() {
            top.draw_text(line, &style, (size.0 as i32 / 2, 10 + 34 * i as i32))?;
        }
        for (area, panel) in body.split_evenly((1, n as usize)).iter().zip(panels) {
            draw_panel(area, panel)?;
        }
        root.present()?;
        Ok(())
    };
    draw().with_context(|| format!("drawing {}", path.display()))
}

fn draw_panel(area: &DrawingArea<BitMapBackend<'_>, Shift>, panel: &Panel) -> Result<()> {
    let finite = |&&(x, y): &&(f64, f64)| x.is_finite() && y.is_finite();
    let all = || {
        panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().filter(finite))
    };
    let (x0, x1) = padded_range(all().map(|p| p.0), 0.0);
    let (y0, y1) = padded_range(all().map(|p| p.1), 0.05);
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 24))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc(&panel.x_label)
        .y_desc(&panel.y_label)
        .x_label_formatter(&|x| tick(*x))
        .y_label_formatter(&|y| tick(*y))
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (i, series) in panel.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<_> = series.points.iter().filter(finite).copied().collect();
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            .label(&series.name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], colour.stroke_width(3)));
    }
    let to_unit = |(x, y): (f64, f64)| ((x - x0) / (x1 - x0), (y - y0) / (y1 - y0));
    chart
        .configure_series_labels()
        .position(emptiest_corner(all().copied().map(to_unit)))
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Axis tick text: whole numbers without a decimal point, others to 4 significant digits.
fn tick(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e9 {
        format!("{v:.0}")
    } else if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e5) {
        let s = format!("{v:.3e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, ""));
        let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
        format!("{mantissa}e{exp}")
    } else {
        let decimals = (3 - v.abs().log10().floor() as i32).max(0) as usize;
        let s = format!("{v:.decimals$}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// The range of `values` widened by `pad` of its span.
fn padded_range(values: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo <= 1e-12 * lo.abs() || hi == lo {
        // A constant (e.g. a learning rate of 5e-7): centre it, scaled to its own size.
        let half = if lo == 0.0 { 1.0 } else { 0.1 * lo.abs() };
        return (lo - half, hi + half);
    }
    let pad = pad * (hi - lo);
    (lo - pad, hi + pad)
}

/// The legend goes in the corner (of the unit square the points were mapped to) that holds the
/// fewest points, so it covers as little of the data as possible.
fn emptiest_corner(points: impl Iterator<Item = (f64, f64)>) -> SeriesLabelPosition {
    let mut counts = [0usize; 4]; // upper-left, upper-right, lower-left, lower-right
    for (x, y) in points {
        let (left, right, upper, lower) = (x < 0.4, x > 0.6, y > 0.65, y < 0.35);
        counts[0] += (left && upper) as usize;
        counts[1] += (right && upper) as usize;
        counts[2] += (left && lower) as usize;
        counts[3] += (right && lower) as usize;
    }
    match (0..4).min_by_key(|&i| counts[i]) {
        Some(0) => SeriesLabelPosition::UpperLeft,
        Some(2) => SeriesLabelPosition::LowerLeft,
        Some(3) => SeriesLabelPosition::LowerRight,
        _ => SeriesLabelPosition::UpperRight,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn assert_png(path: &Path) {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{} is not a PNG",
            path.display()
        );
        assert!(
            bytes.len() > 5_000,
            "{} is suspiciously small",
            path.display()
        );
    }

    #[test]
    fn plots_one_png_per_metric_with_one_line_per_run() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("gd"), dir.path().join("sam"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let mut la = String::new();
        let mut lb = String::new();
        for step in 0..20 {
            let s = step as f64;
            la += &format!(
                "{{\"step\":{step},\"loss\":{},\"rewards/accuracies\":{},\"phase\":\"train\"}}\n",
                0.7 - 0.01 * s,
                0.5 + 0.02 * s
            );
            lb += &format!("{{\"step\":{step},\"loss\":{}}}\n", 0.7 - 0.02 * s);
            if step % 5 == 0 {
                lb += &format!("{{\"step\":{step},\"eval/loss\":{}}}\n", 0.8 - 0.01 * s);
            }
        }
        std::fs::write(a.join("metrics.jsonl"), la).unwrap();
        std::fs::write(b.join("metrics.jsonl"), lb).unwrap();
        let out = dir.path().join("plots");
        let written = plot_metrics(&[a, b.join("metrics.jsonl")], &[], &out).unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["eval_loss.png", "loss.png", "rewards_accuracies.png"]
        );
        for path in &written {
            assert_png(path);
        }
    }

    #[test]
    fn malformed_line_is_reported_with_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("metrics.jsonl");
        std::fs::write(
            &file,
            "{\"step\":0,\"loss\":1.0}\n\n{\"step\":1,\"loss\":\n",
        )
        .unwrap();
        let err =
            plot_metrics(std::slice::from_ref(&file), &[], &dir.path().join("out")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&format!("{}:3", file.display())),
            "error does not name file:line: {msg}"
        );
    }

    #[test]
    fn label_count_must_match_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let err = plot_metrics(
            &[dir.path().to_path_buf()],
            &["a".into(), "b".into()],
            dir.path(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("--label"), "{err}");
    }
}
